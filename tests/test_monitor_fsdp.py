"""GradientMonitor under FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` per layer) on
2 CPU processes over gloo: every parameter and gradient is a DTensor whose shard may be empty on
a rank, and the monitor writes the whole model's numbers, the single-process run's on the same
data, with one all-reduce per logging step for the scalars."""

import json
import math
import os
import socket
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.monitor import GradientMonitor
from gradwatch.monitor.sharded import check_layout


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # fc1: 8 rows, 4 a rank. fc2: one row, so rank 1's shards of fc2 are empty.
        self.fc1 = nn.Linear(3, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


class Module(pl.LightningModule):
    def __init__(self, nan_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()
        self.nan_at_step = nan_at_step

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net.fc1, self.net.fc2):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def on_after_backward(self) -> None:
        """At `nan_at_step`, one NaN in fc1.weight's gradient: row 4, which FSDP gives rank 1."""
        if self.global_step != self.nan_at_step:
            return
        grad = self.net.fc1.weight.grad
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            if self.global_rank == 1:
                grad.to_local()[0, 0] = math.nan
        else:
            grad[4, 0] = math.nan

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Collectives(TorchDispatchMode):
    """Counts the collectives (c10d and functional c10d ops) run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class CountingMonitor(GradientMonitor):
    """The monitor, its two hooks of a logging step run inside :class:`Collectives`; each rank
    writes what it counted per step, and its alert state, at the end."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.counts: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.counting = trainer.fit_loop.epoch_loop._batches_that_stepped
        with Collectives() as seen:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._add(seen)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with Collectives() as seen:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._add(seen)

    def _add(self, seen: Collectives) -> None:
        self.counts[self.counting] = self.counts.get(self.counting, 0) + len(seen.ops)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        record = {"counts": self.counts, "summary": self.summary()}
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(record, f)


MONITOR = {"norm_types": (2, 1, "inf"), "histogram_every_n_steps": 2, "histogram_min_values": 1}
STEPS = 4


def data(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(path: str, monitor: GradientMonitor, nan_at_step: int | None = None, **kwargs) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(path, name="tb", version=0),
        callbacks=[monitor],
        max_epochs=STEPS,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path,
        **kwargs,
    )
    # The same 8 samples: one batch of 8, or 4 on each of two ranks (Lightning's sampler).
    trainer.fit(Module(nan_at_step), data(8 if kwargs.get("devices", 1) == 1 else 4))


def fsdp_worker(
    rank: int, path: str, port: int, monitor_kwargs: dict, nan_at_step: int | None
) -> None:
    """One of the two processes: the environment of processes started together (as torchrun
    would), so that Lightning starts none itself."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    # A collective that one rank never joins fails the test in a minute instead of hanging it.
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60)
    )
    monitor = CountingMonitor(path, **monitor_kwargs)
    fit(path, monitor, nan_at_step, devices=2, strategy=strategy)


def run_fsdp(path, nan_at_step: int | None = None, **monitor_kwargs) -> None:
    path.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (str(path), port, monitor_kwargs, nan_at_step)
    mp.spawn(fsdp_worker, args=args, nprocs=2, join=True)


def events(path) -> EventAccumulator:
    guidance = {"scalars": 0, "histograms": 0}
    acc = EventAccumulator(str(path / "tb" / "version_0"), size_guidance=guidance)
    acc.Reload()
    return acc


def ranks(path) -> list[dict]:
    return [json.loads((path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_fsdp_writes_the_single_process_norms_histograms_and_alerts(tmp_path):
    fit(str(tmp_path / "single"), GradientMonitor(**MONITOR))
    run_fsdp(tmp_path / "fsdp", **MONITOR)
    single, fsdp = events(tmp_path / "single"), events(tmp_path / "fsdp")
    assert len(list((tmp_path / "fsdp" / "tb" / "version_0").glob("events.*"))) == 1

    families = ("grad_norm", "weight_norm/", "update_ratio/")
    tags = [t for t in single.Tags()["scalars"] if t.startswith(families)]
    expected = {
        "grad_norm/total",
        "grad_norm_inf/fc2.weight",
        "grad_norm_1/fc1",
        "update_ratio/fc2",
    }
    assert expected <= set(tags)
    assert sorted(t for t in fsdp.Tags()["scalars"] if t.startswith(families)) == sorted(tags)
    for tag in tags:
        a, b = single.Scalars(tag), fsdp.Scalars(tag)
        # Rank zero alone writes: each step once.
        assert [e.step for e in b] == [e.step for e in a] == list(range(STEPS)), tag
        for ea, eb in zip(a, b, strict=True):
            assert math.isclose(ea.value, eb.value, rel_tol=1e-6), (
                tag,
                ea.step,
                ea.value,
                eb.value,
            )

    hist_tags = single.Tags()["histograms"]
    assert {"grad_hist/fc1.weight", "weight_hist/fc2.bias"} <= set(hist_tags)
    assert sorted(fsdp.Tags()["histograms"]) == sorted(hist_tags)
    for tag in hist_tags:
        a, b = single.Histograms(tag), fsdp.Histograms(tag)
        assert [e.step for e in b] == [e.step for e in a] == [1, 3], tag
        for ea, eb in zip(a, b, strict=True):
            ha, hb = ea.histogram_value, eb.histogram_value
            assert list(hb.bucket) == list(ha.bucket), tag  # the same counts in the same bins
            assert hb.num == ha.num, tag
            # FSDP averages the two halves' gradients (reduce-scatter) where one process takes
            # the whole batch's: single values differ in float32's last bits, relative to the
            # tensor's largest value. The monitor adds nothing to that.
            close = {"rel": 1e-6, "abs": 1e-6 * max(abs(ha.min), abs(ha.max))}
            assert [hb.min, hb.max] == pytest.approx([ha.min, ha.max], **close), tag
            limits = pytest.approx(list(ha.bucket_limit), **close)
            assert list(hb.bucket_limit) == limits, tag
            # A sum's rounding grows with its count of values.
            assert hb.sum == pytest.approx(ha.sum, abs=close["abs"] * ha.num), tag
            assert hb.sum_squares == pytest.approx(ha.sum_squares, rel=1e-6), tag

    # Every rank keeps the same alert state; rank zero's summary is the single-process run's.
    rank0, rank1 = ranks(tmp_path / "fsdp")
    assert rank0["summary"] == rank1["summary"]
    single_summary = json.loads((tmp_path / "single" / "gradients.json").read_text())
    assert json.loads((tmp_path / "fsdp" / "gradients.json").read_text())["steps"] == list(
        range(STEPS)
    )
    assert rank0["summary"]["steps"] == single_summary["steps"]
    # The same alerts at the same steps on the same layers; the numbers quoted as evidence agree
    # to float32 rounding (the sharded sums add in another order).
    assert_same_alerts(rank0["summary"]["alerts"], single_summary["alerts"])

    # Collectives of the monitor per logging step: the scalars' all-reduce (SUM), the inf norms'
    # (MAX, which also carries the histogram ranges); a histogram step adds the counts' sum.
    for record in (rank0, rank1):
        assert record["counts"] == {"0": 2, "1": 3, "2": 2, "3": 3}


@pytest.mark.slow
def test_fsdp_logging_step_is_one_all_reduce(tmp_path):
    """The default monitor (L2 norms, weight norms, update ratios, non-finite counts, the loss
    for the alerts) and no histogram step: one all-reduce per logging step, none between."""
    run_fsdp(tmp_path / "fsdp", histogram_every_n_steps=0, log_every_n_steps=2)
    for record in ranks(tmp_path / "fsdp"):
        assert record["counts"] == {"0": 0, "1": 1, "2": 0, "3": 1}


@pytest.mark.slow
def test_fsdp_every_step_is_the_single_process_every_step_in_the_same_all_reduce(tmp_path):
    """every_step under FSDP2: each rank keeps its shards' norms of every step, and they join
    the logging step's one all-reduce; every step's whole-model norms are the single-process
    run's (at log_every_n_steps=1), and no step between logging steps has a collective."""
    fit(str(tmp_path / "single"), GradientMonitor(norm_types=(2, 1, "inf")))
    run_fsdp(
        tmp_path / "fsdp",
        every_step=True,
        log_every_n_steps=2,
        histogram_every_n_steps=0,
        norm_types=(2, 1, "inf"),
    )
    single, fsdp = events(tmp_path / "single"), events(tmp_path / "fsdp")
    tags = [t for t in single.Tags()["scalars"] if t.startswith("grad_norm")]
    assert {"grad_norm/total", "grad_norm_inf/fc2.weight", "grad_norm_log10/fc1"} <= set(tags)
    for tag in tags:
        a, b = single.Scalars(tag), fsdp.Scalars(tag)
        assert [e.step for e in b] == [e.step for e in a] == list(range(STEPS)), tag
        for ea, eb in zip(a, b, strict=True):
            assert math.isclose(ea.value, eb.value, rel_tol=1e-6, abs_tol=1e-7), (tag, ea.step)
    # weight norms stay at the monitor's cadence of 2.
    assert [e.step for e in fsdp.Scalars("weight_norm/fc1.weight")] == [1, 3]
    # The inf norms need a MAX beside the SUM: two collectives per logging step, none between.
    for record in ranks(tmp_path / "fsdp"):
        assert record["counts"] == {"0": 0, "1": 2, "2": 0, "3": 2}


@pytest.mark.slow
def test_fsdp_counts_a_nonfinite_value_of_one_shard_and_stops_every_rank(tmp_path):
    """A NaN in rank 1's shard of fc1.weight at step 2, between logging steps: every rank counts
    it, raises the single-process run's alert (first seen at step 2, the earliest over the
    ranks) and stops at the same logging step."""
    monitor = {"log_every_n_steps": 2, "histogram_every_n_steps": 0, "on_nonfinite": "stop"}
    monitor["norm_types"] = (2, "inf")  # a NaN through the MAX all-reduce too
    fit(str(tmp_path / "single"), GradientMonitor(**monitor), nan_at_step=2)
    run_fsdp(tmp_path / "fsdp", nan_at_step=2, **monitor)
    single = json.loads((tmp_path / "single" / "gradients.json").read_text())
    rank0, rank1 = ranks(tmp_path / "fsdp")
    assert rank0["summary"] == rank1["summary"]
    alerts = rank0["summary"]["alerts"]
    assert [(a["step"], a["kind"]) for a in alerts] == [(3, "nonfinite")]
    assert "first seen at step 2" in alerts[0]["message"]
    assert alerts == single["alerts"]
    nonfinite = events(tmp_path / "fsdp").Scalars("grad_nonfinite/fc1")
    assert [(e.step, e.value) for e in nonfinite] == [
        (e.step, e.value) for e in events(tmp_path / "single").Scalars("grad_nonfinite/fc1")
    ]
    assert rank0["summary"]["steps"] == single["steps"] == [1, 3]
    for tag in ("grad_norm_inf/fc1", "grad_norm_inf/fc2.weight", "grad_norm/total"):
        a = [e.value for e in events(tmp_path / "single").Scalars(tag)]
        b = [e.value for e in events(tmp_path / "fsdp").Scalars(tag)]
        assert math.isclose(a[0], b[0], rel_tol=1e-6) and math.isnan(a[1]) and math.isnan(b[1])


def test_layouts_the_sums_would_get_wrong_are_refused():
    """Replicated DTensors (as tensor parallelism makes) and plain parameters next to sharded
    ones would be counted once per rank or once by each rank: refused, naming the parameter."""
    torch.distributed.init_process_group(
        "gloo", rank=0, world_size=1, store=torch.distributed.HashStore()
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        net = Net()
        assert check_layout(net, world_size=1) is False  # nothing sharded: nothing to combine
        net.fc1.weight = nn.Parameter(distribute_tensor(net.fc1.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="fc1.bias is not sharded while other parameters"):
            check_layout(net, world_size=1)
        net = Net()
        for layer in (net.fc1, net.fc2):
            for attr in ("weight", "bias"):
                replicated = layer is net.fc2 and attr == "bias"
                values = getattr(layer, attr).detach()
                placement = Replicate() if replicated else Shard(0)
                setattr(layer, attr, nn.Parameter(distribute_tensor(values, mesh, [placement])))
        with pytest.raises(ValueError, match=r"fc2.bias is laid out as \(Replicate\(\),\)"):
            check_layout(net, world_size=1)
        with pytest.raises(ValueError, match="over 1 of 2 ranks"):
            check_layout(net, world_size=2)
    finally:
        torch.distributed.destroy_process_group()


def assert_same_alerts(got: list[dict], expected: list[dict]) -> None:
    def key(a: dict) -> tuple:
        return a["step"], a["kind"], a["layers"]

    assert [key(a) for a in got] == [key(a) for a in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["evidence"].keys() == b["evidence"].keys()
        for name, value in a["evidence"].items():
            if isinstance(value, float):
                assert value == pytest.approx(b["evidence"][name], rel=1e-4), (key(a), name)
            else:
                assert value == b["evidence"][name], (key(a), name)
