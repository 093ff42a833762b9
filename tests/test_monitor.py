"""GradientMonitor: every logged number recomputed another way (plain PyTorch, an identity, or by
hand), read back from the event files with TensorBoard's own reader."""

import copy
import csv
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.monitor import GradientAlert, GradientMonitor
from gradwatch.monitor.histograms import histc_ as _histc_
from gradwatch.monitor.names import parameter_names as _parameter_names
from gradwatch.report import save_grad_flow

X_XOR = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y_XOR = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


class Net(nn.Module):
    def __init__(self, sizes=(2, 2, 1)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


class Module(pl.LightningModule):
    """The tutorial's network under `self.net`; `optimizer` is a callable of the parameters."""

    def __init__(self, net=None, optimizer=None, loss_scale=None, after_backward=None) -> None:
        super().__init__()
        self.net = net if net is not None else Net()
        self.make_optimizer = optimizer or (lambda p: torch.optim.SGD(p, lr=0.01))
        self.loss_scale = loss_scale
        self.after_backward = after_backward

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        if self.loss_scale is not None:
            loss = loss * self.loss_scale(self.global_step)
        return loss

    def on_after_backward(self):
        if self.after_backward is not None:
            self.after_backward(self)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def xor_loader(batch_size=4, x=X_XOR, y=Y_XOR):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_trainer(tmp_path, monitor, logger="tb", **kwargs):
    if logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="tb")
    kwargs.setdefault("max_epochs", 10)
    kwargs.setdefault("log_every_n_steps", 1)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor] if monitor is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def read_events(log_dir):
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def scalars(acc):
    """{tag: {step: value}} of every scalar in the run."""
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def histograms(acc):
    return {
        t: {e.step: e.histogram_value for e in acc.Histograms(t)} for t in acc.Tags()["histograms"]
    }


def alerts_of(record, kind=None):
    out = [str(w.message) for w in record if issubclass(w.category, GradientAlert)]
    return [m for m in out if kind is None or kind in m]


class Recorder(pl.Callback):
    """Copies of the parameters at the start of every batch and at the end: w_0, w_1, ..."""

    def __init__(self):
        self.weights = []

    def _snap(self, pl_module):
        return {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(self._snap(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.weights.append(self._snap(pl_module))


def fit(tmp_path, monitor, module=None, loader=None, logger="tb", extra_callbacks=(), **kwargs):
    torch.manual_seed(0)  # the same initial weights as `plain_sgd`
    module = module() if module is not None else Module()
    trainer = make_trainer(tmp_path, monitor, logger=logger, **kwargs)
    trainer.callbacks.extend(extra_callbacks)
    trainer.fit(module, loader if loader is not None else xor_loader())
    return trainer, module


# ----------------------------------------------------------------------------------------------
# Arguments and names
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_nonfinite": "boom"}, r"on_nonfinite must be one of \['warn', 'stop'\], got 'boom'"),
        ({"log_every_n_steps": -1}, "log_every_n_steps must be an int >= 0 or None"),
        ({"histogram_every_n_steps": 1.5}, "histogram_every_n_steps must be an int >= 0"),
        ({"bins": 0}, "bins must be an int >= 1"),
        ({"histogram_min_values": 0}, "histogram_min_values must be an int >= 1"),
        ({"norm_types": [2, -1]}, "norm_types must hold numbers > 0 or 'inf'"),
        ({"norm_types": "inf"}, "norm_types must be a list"),
        ({"exploding_factor": 1}, "exploding_factor must be a number > 1"),
        ({"vanishing_patience": 0}, "vanishing_patience must be an int >= 1"),
        ({"stall_loss_tol": -0.1}, "stall_loss_tol must be a number >= 0"),
    ],
)
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


def test_norm_types_always_include_l2():
    assert GradientMonitor(norm_types=["inf", 1]).norm_types == [2.0, math.inf, 1.0]
    assert GradientMonitor(norm_types=[2, 2.0]).norm_types == [2.0]


def test_layer_names_strip_the_shared_module_path():
    class Wrapper(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

    plain = Wrapper(Net())
    assert sorted(_parameter_names(plain).values()) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
    ]
    compiled = Wrapper(torch.compile(Net(), backend="eager"))
    assert sorted(_parameter_names(compiled).values())[0] == "fc1.bias"
    # A single layer keeps its name: stripping stops where the `layer.param` form would be lost.
    one = Wrapper(nn.Linear(2, 1))
    assert sorted(_parameter_names(one).values()) == ["net.bias", "net.weight"]


def test_sharded_strategy_is_refused_before_training():
    monitor = GradientMonitor()
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="does not support FSDPStrategy"):
        monitor.setup(trainer, None, "fit")


# ----------------------------------------------------------------------------------------------
# Cadence and cost
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("every", "accumulate"), [(3, 1), (1, 1), (2, 2)])
def test_written_on_the_same_steps_as_lightning(tmp_path, every, accumulate):
    # Two batches of two per epoch: with accumulation, one optimizer step per epoch.
    loader = xor_loader(batch_size=2)
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(),
        loader=loader,
        max_epochs=12,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
    )
    values = scalars(read_events(trainer.logger.log_dir))
    loss_steps = sorted(values["train/loss"])
    assert loss_steps, "Lightning logged nothing"
    assert sorted(values["grad_norm/total"]) == loss_steps
    assert sorted(values["grad_norm/fc1.weight"]) == loss_steps


def test_histogram_cadence_defaults_to_ten_times_the_scalars(tmp_path):
    monitor = GradientMonitor(histogram_min_values=1)  # the tutorial's tensors are all small
    trainer, _ = fit(tmp_path, monitor, max_epochs=40, log_every_n_steps=2)
    hists = histograms(read_events(trainer.logger.log_dir))
    assert sorted(hists["grad_hist/fc1.weight"]) == [19, 39]
    assert sorted(hists["weight_hist/fc2.bias"]) == [19, 39]


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_subclass_that_overrides_on_train_batch_end_gets_every_step(tmp_path):
    """The monitor hides its own on_train_batch_end on steps that collect nothing, not a
    subclass's."""

    class Counting(GradientMonitor):
        steps: list[int] = []

        def on_train_batch_end(self, trainer, *args):
            Counting.steps.append(trainer.global_step)
            super().on_train_batch_end(trainer, *args)

    trainer, _ = fit(tmp_path, Counting(log_every_n_steps=4), max_epochs=8)
    assert Counting.steps == list(range(1, 9))
    assert sorted(scalars(read_events(trainer.logger.log_dir))["grad_norm/total"]) == [3, 7]


def test_nothing_at_all_on_other_steps_and_one_transfer_on_logging_steps(tmp_path, monkeypatch):
    """Every tensor op the monitor's hooks run, and every `.tolist()`, counted per step."""
    monitor = GradientMonitor(
        log_every_n_steps=4, histogram_every_n_steps=8, histogram_min_values=1
    )
    ops: dict[int, list[str]] = {}
    transfers: dict[int, int] = {}
    real_tolist = torch.Tensor.tolist
    current = {"step": -1}

    def counting_tolist(self):
        transfers[current["step"]] = transfers.get(current["step"], 0) + 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)

    calls: list[tuple[str, int]] = []

    def wrap(hook):
        def wrapped(self, trainer, *args):
            current["step"] = trainer.fit_loop.epoch_loop._batches_that_stepped
            calls.append((hook.__name__, current["step"]))
            with OpCounter() as counter:
                hook(self, trainer, *args)
            ops.setdefault(current["step"], []).extend(counter.ops)

        return wrapped

    for name in ("on_before_optimizer_step", "on_train_batch_end"):
        monkeypatch.setattr(GradientMonitor, name, wrap(getattr(GradientMonitor, name)))
    fit(tmp_path, monitor, max_epochs=16)
    # Both hooks run on every step (nothing is hidden from Lightning) and do nothing on most.
    assert [step for name, step in calls if name == "on_train_batch_end"] == list(range(16))
    assert len([step for name, step in calls if name == "on_before_optimizer_step"]) == 16
    # Once per run, at the first step: the loss read back (the diagnosis measures progress
    # from it).
    assert ops[0] == ["aten.detach.default", "aten._local_scalar_dense.default"]
    for step in range(1, 16):
        if (step + 1) % 4:
            assert ops[step] == [], f"step {step} ran {ops[step]}"
            assert transfers.get(step, 0) == 0
        else:
            assert ops[step]
            # One transfer for the scalars, a second on histogram steps for the counts.
            assert transfers[step] == (2 if (step + 1) % 8 == 0 else 1)


# ----------------------------------------------------------------------------------------------
# Truth in every training mode
# ----------------------------------------------------------------------------------------------


def plain_sgd_fit(tmp_path, monitor, lr, max_epochs):
    """The tutorial's network in float64 under SGD without momentum, so that g_k =
    (w_k - w_{k+1}) / lr loses nothing of lr * g_k to rounding. Returns the Trainer and the
    weights w_0, w_1, ... (``Recorder.weights``)."""
    recorder = Recorder()
    trainer, _ = fit(
        tmp_path,
        monitor,
        module=lambda: Module(net=Net().double(), optimizer=lambda p: torch.optim.SGD(p, lr=lr)),
        loader=xor_loader(x=X_XOR.double(), y=Y_XOR.double()),
        max_epochs=max_epochs,
        extra_callbacks=[recorder],
    )
    return trainer, recorder.weights


def test_plain_sgd_norms_equal_weight_steps_over_lr(tmp_path):
    """For SGD without momentum, g_k = (w_k - w_{k+1}) / lr: every logged norm, recomputed."""
    lr = 0.5
    trainer, w = plain_sgd_fit(tmp_path, GradientMonitor(norm_types=(2, "inf", 1)), lr, 6)
    values = scalars(read_events(trainer.logger.log_dir))
    for k in range(6):
        grads = {n: (w[k][n] - w[k + 1][n]) / lr for n in w[k]}
        for n, g in grads.items():
            assert values[f"grad_norm/{n}"][k] == pytest.approx(g.norm().item(), rel=1e-5)
            assert values[f"grad_norm_inf/{n}"][k] == pytest.approx(g.abs().max().item(), rel=1e-5)
            assert values[f"grad_norm_1/{n}"][k] == pytest.approx(g.abs().sum().item(), rel=1e-5)
            assert values[f"weight_norm/{n}"][k] == pytest.approx(w[k][n].norm().item(), rel=1e-6)
        for layer in ("fc1", "fc2"):
            g = torch.cat([grads[f"{layer}.weight"].flatten(), grads[f"{layer}.bias"]])
            assert values[f"grad_norm/{layer}"][k] == pytest.approx(g.norm().item(), rel=1e-5)
            before = torch.cat([w[k][f"{layer}.weight"].flatten(), w[k][f"{layer}.bias"]])
            ratio = (lr * g).norm() / before.norm()
            assert values[f"update_ratio/{layer}"][k] == pytest.approx(ratio.item(), rel=1e-5)
        everything = torch.cat([g.flatten() for g in grads.values()])
        # The total is the norm of all gradients: not the sum of the layer norms.
        assert values["grad_norm/total"][k] == pytest.approx(everything.norm().item(), rel=1e-5)


class MixedNet(nn.Module):
    """Layers of two dtypes, float64 ones on both sides of a float32 one: the monitor's
    one-kernel-per-dtype groups hold the parameters in another order than the model does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3).double()
        self.fc2 = nn.Linear(3, 3)
        self.fc3 = nn.Linear(3, 1).double()

    def forward(self, x):
        hidden = torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x.double())).float()))
        return self.fc3(hidden.double()).float()


@pytest.mark.parametrize("hist_every", [1, 0])  # histograms on the device path at every step
def test_mixed_dtypes_keep_every_value_with_its_parameter(tmp_path, hist_every):
    recorder = Recorder()
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(histogram_every_n_steps=hist_every, histogram_min_values=1),
        module=lambda: Module(net=MixedNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5)),
        max_epochs=3,
        extra_callbacks=[recorder],
    )
    acc = read_events(trainer.logger.log_dir)
    values, hists = scalars(acc), histograms(acc)
    w = recorder.weights
    for k in range(3):
        for n in w[k]:
            g = (w[k][n] - w[k + 1][n]) / 0.5
            assert values[f"grad_norm/{n}"][k] == pytest.approx(g.norm().item(), rel=1e-4), n
            assert values[f"weight_norm/{n}"][k] == pytest.approx(w[k][n].norm().item(), rel=1e-6)
            if hist_every:
                assert hists[f"weight_hist/{n}"][k].num == w[k][n].numel()
                assert hists[f"weight_hist/{n}"][k].max == pytest.approx(w[k][n].max().item())
        for layer in ("fc1", "fc2", "fc3"):
            before = torch.cat([w[k][f"{layer}.{p}"].flatten() for p in ("weight", "bias")])
            after = torch.cat([w[k + 1][f"{layer}.{p}"].flatten() for p in ("weight", "bias")])
            ratio = ((after - before).norm() / before.norm()).item()
            assert values[f"update_ratio/{layer}"][k] == pytest.approx(ratio, rel=1e-5), layer


class GradientRecorder(Recorder):
    """The weights at every batch start (``Recorder``) and copies of the gradients the
    optimizer steps with."""

    def __init__(self):
        super().__init__()
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.net.named_parameters()})


class DeadUnitNet(nn.Module):
    """2-4-1 with ReLU, its first hidden unit dead (a bias of -100): that unit's weights get
    gradients of exactly 0, which no optimizer step is asked to apply."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 4), nn.Linear(4, 1)
        with torch.no_grad():
            self.fc1.bias[0] = -100.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "optimizer",
    [lambda p: torch.optim.SGD(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=1e-3)],
    ids=["sgd", "adam"],
)
def test_bf16_weights_rounded_away_share_equals_the_weights_that_stayed(tmp_path, optimizer):
    """``update_rounded_away/<layer>`` of bfloat16 weights: of the values whose gradient was not
    0, the share the step left exactly as they were, recomputed from the weights before and
    after each step and the gradients the optimizer got."""
    recorder = GradientRecorder()
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(),
        module=lambda: Module(net=DeadUnitNet(), optimizer=optimizer),
        loader=xor_loader(x=X_XOR.bfloat16(), y=Y_XOR.bfloat16()),
        precision="bf16-true",
        max_epochs=8,
        extra_callbacks=[recorder],
    )
    values = scalars(read_events(trainer.logger.log_dir))
    w, g = recorder.weights, recorder.grads
    shares = []
    for k in range(8):
        for layer in ("fc1", "fc2"):
            names = [f"{layer}.weight", f"{layer}.bias"]
            asked = torch.cat([(g[k][n] != 0).flatten() for n in names])
            stayed = torch.cat([(w[k + 1][n] == w[k][n]).flatten() for n in names])
            share = (asked & stayed).sum().item() / asked.sum().item()
            assert values[f"update_rounded_away/{layer}"][k] == pytest.approx(share, abs=1e-7)
            shares.append(share)
    assert 0 < max(shares) and min(shares) < 1  # some updates lost, some applied
    # float32 weights have no such tag.
    trainer, _ = fit(tmp_path / "f32", GradientMonitor(), max_epochs=2)
    assert not any(
        t.startswith("update_rounded_away/") for t in scalars(read_events(trainer.logger.log_dir))
    )


@pytest.mark.parametrize(("eps", "nan"), [(1e-8, True), (1e-4, False)])
def test_float16_weights_nan_from_adams_eps_is_named(tmp_path, eps, nan):
    """16-true with Adam: at eps 1e-8 (0 in float16) the dead unit's values, whose gradient is
    exactly 0, step by 0/0 at the first step, and the nonfinite alert says why; at eps 1e-4 the
    same run stays finite."""
    monitor = GradientMonitor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, module = fit(
            tmp_path,
            monitor,
            module=lambda: Module(
                net=DeadUnitNet(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, eps=eps)
            ),
            loader=xor_loader(x=X_XOR.half(), y=Y_XOR.half()),
            precision="16-true",
            max_epochs=3,
        )
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert bool(weights.isnan().any()) is nan  # plain PyTorch's account of the run
    kinds = [a["kind"] for a in monitor.summary()["alerts"]]
    if not nan:
        assert "nonfinite" not in kinds
        return
    [alert] = [a for a in monitor.summary()["alerts"] if a["kind"] == "nonfinite"]
    assert "eps of 1e-08 is 0" in alert["message"] and "16-mixed" in alert["fix"]
    assert set(alert["evidence"]["zero_eps"]) <= {"fc1", "fc2"}


def plain_sgd(steps, lr, clip=None, batches=None):
    """The tutorial's loop in plain PyTorch: the gradient before clipping at every step."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(X_XOR), Y_XOR).backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        total = torch.cat([g.flatten() for g in grads.values()]).norm().item()
        clipped = None
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            clipped = torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item()
        out.append((grads, total, clipped))
        opt.step()
    return out


def test_accumulated_gradient_equals_the_full_batch_gradient(tmp_path):
    # Two micro-batches of two XOR points, accumulated: one log per optimizer step, of the
    # gradient of the whole batch (Lightning divides each micro-batch loss by 2).
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(),
        loader=xor_loader(batch_size=2),
        max_epochs=5,
        accumulate_grad_batches=2,
    )
    values = scalars(read_events(trainer.logger.log_dir))
    assert sorted(values["grad_norm/total"]) == [0, 1, 2, 3, 4]
    for k, (grads, total, _) in enumerate(plain_sgd(5, lr=0.01)):
        assert values["grad_norm/total"][k] == pytest.approx(total, rel=1e-5)
        for n, g in grads.items():
            assert values[f"grad_norm/{n}"][k] == pytest.approx(g.norm().item(), rel=1e-5)


def test_clipping_logs_norms_before_and_the_total_after(tmp_path):
    clip = 0.05
    trainer, _ = fit(
        tmp_path, GradientMonitor(), max_epochs=5, gradient_clip_val=clip, log_every_n_steps=1
    )
    values = scalars(read_events(trainer.logger.log_dir))
    for k, (grads, total, clipped) in enumerate(plain_sgd(5, lr=0.01, clip=clip)):
        assert total > clip  # the clip is active at every step
        assert values["grad_norm/total"][k] == pytest.approx(total, rel=1e-5)
        assert values["grad_norm/fc2.weight"][k] == pytest.approx(
            grads["fc2.weight"].norm().item(), rel=1e-5
        )
        assert values["grad_norm/total_clipped"][k] == pytest.approx(clipped, rel=1e-5)
        assert values["grad_norm/total_clipped"][k] == pytest.approx(clip, rel=1e-4)


def test_no_clipped_tag_without_clipping(tmp_path):
    trainer, _ = fit(tmp_path, GradientMonitor(), max_epochs=2)
    assert "grad_norm/total_clipped" not in scalars(read_events(trainer.logger.log_dir))


def test_bf16_mixed_equals_plain_autocast(tmp_path):
    trainer, _ = fit(tmp_path, GradientMonitor(), max_epochs=1, precision="bf16-mixed")
    values = scalars(read_events(trainer.logger.log_dir))
    torch.manual_seed(0)
    net = Net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(net(X_XOR), Y_XOR)
    loss.backward()
    for n, p in net.named_parameters():
        assert values[f"grad_norm/{n}"][0] == pytest.approx(p.grad.norm().item(), rel=1e-5)


@pytest.mark.parametrize("growth_interval", [2000, 1])
@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_values_are_unscaled_even_for_fused_optimizers(
    tmp_path, fused, growth_interval
):
    """A GradScaler on CPU: Lightning unscales before the hook for Adam, not for fused Adam
    (which unscales inside `step()`); both must log the plain autocast gradients. With
    growth_interval=1 the scaler changes its scale within the step (as it halves it on an
    overflow): the values must be divided by the scale the gradients were made with."""
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(histogram_every_n_steps=1, histogram_min_values=1),
        module=lambda: Module(optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, fused=fused)),
        max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    # The gradients really were scaled by 65536; the scale doubled after the step if asked to.
    assert scaler.get_scale() == 65536.0 * (2 if growth_interval == 1 else 1)
    acc = read_events(trainer.logger.log_dir)
    values, hists = scalars(acc), histograms(acc)
    torch.manual_seed(0)
    net = Net()
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        loss = nn.functional.mse_loss(net(X_XOR), Y_XOR)
    loss.backward()
    for n, p in net.named_parameters():
        assert values[f"grad_norm/{n}"][0] == pytest.approx(p.grad.norm().item(), rel=1e-6)
        h = hists[f"grad_hist/{n}"][0]
        assert (h.min, h.max) == pytest.approx((p.grad.min().item(), p.grad.max().item()), rel=1e-6)
        assert h.sum_squares == pytest.approx(p.grad.norm().item() ** 2, rel=1e-5)


def test_compiled_network_gives_the_same_values(tmp_path):
    eager, _ = fit(tmp_path / "eager", GradientMonitor(), max_epochs=3)
    compiled, _ = fit(
        tmp_path / "compiled",
        GradientMonitor(),
        module=lambda: Module(torch.compile(Net(), backend="eager")),
        max_epochs=3,
    )
    a = scalars(read_events(eager.logger.log_dir))
    b = scalars(read_events(compiled.logger.log_dir))
    for tag in ("grad_norm/fc1.weight", "grad_norm/fc1", "grad_norm/total", "update_ratio/fc2"):
        assert b[tag] == pytest.approx(a[tag], rel=1e-6)


class TwoOptimizers(Module):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt1, opt2 = self.optimizers()
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        opt1.zero_grad()
        opt2.zero_grad()
        self.manual_backward(loss)
        opt1.step()
        opt2.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net.fc1.parameters(), lr=0.1),
            torch.optim.SGD(self.net.fc2.parameters(), lr=0.1),
        ]


def test_every_optimizer_is_covered_once_per_step(tmp_path):
    trainer, _ = fit(tmp_path, GradientMonitor(), module=TwoOptimizers, max_epochs=3)
    values = scalars(read_events(trainer.logger.log_dir))
    assert sorted(values["grad_norm/fc1.weight"]) == sorted(values["train/loss"]) == [0, 1, 2]
    assert sorted(values["grad_norm/fc2.weight"]) == [0, 1, 2]
    # Two SGD optimizers with one lr on disjoint layers make one plain SGD.
    for k, (_, total, _) in enumerate(plain_sgd(3, lr=0.1)):
        assert values["grad_norm/total"][k] == pytest.approx(total, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Histograms and non-finite values
# ----------------------------------------------------------------------------------------------


def test_histograms_count_the_finite_values(tmp_path):
    def corrupt(module):
        net = module.net
        net.fc1.weight.grad[0, 0] = float("nan")
        net.fc1.weight.grad[1, 1] = float("inf")
        net.fc1.bias.grad.fill_(0.5)  # constant
        net.fc2.bias.grad.fill_(float("nan"))  # all NaN

    recorder = Recorder()

    def module():
        return Module(net=Net((2, 16, 1)), after_backward=corrupt)

    with pytest.warns(GradientAlert, match="non-finite gradients at step 0 .*fc1 \\(2 values\\)"):
        trainer, _ = fit(
            tmp_path,
            GradientMonitor(histogram_every_n_steps=1, bins=16),
            module=module,
            max_epochs=1,
            extra_callbacks=[recorder],
        )
    acc = read_events(trainer.logger.log_dir)
    hists = histograms(acc)
    values = scalars(acc)
    assert values["grad_nonfinite/fc1"][0] == 2
    assert values["grad_nonfinite/fc2"][0] == 1
    assert values["grad_nonfinite/total"][0] == 3
    h = hists["grad_hist/fc1.weight"][0]
    assert h.num == 32 - 2 and sum(h.bucket) == 30
    assert math.isfinite(h.min) and math.isfinite(h.max)
    h = hists["grad_hist/fc1.bias"][0]
    assert (h.min, h.max, h.num, sum(h.bucket)) == (0.5, 0.5, 16, 16)
    assert "grad_hist/fc2.bias" not in hists  # nothing finite to draw
    # The weights: the counts, recomputed with numpy's histogram over the same range.
    w = recorder.weights[0]["fc1.weight"].flatten().double().numpy()
    h = hists["weight_hist/fc1.weight"][0]
    assert h.num == w.size == sum(h.bucket)
    assert (h.min, h.max) == pytest.approx((w.min(), w.max()), rel=1e-6)
    expected, _ = np.histogram(w, bins=16, range=(w.min(), w.max()))
    assert list(h.bucket) == [0.0, *expected.tolist()]
    assert h.sum == pytest.approx(w.sum(), rel=1e-5, abs=1e-7)
    assert h.sum_squares == pytest.approx((w**2).sum(), rel=1e-5)


@pytest.mark.parametrize("clip", [None, 10.0])
def test_nonfinite_values_are_counted_per_layer(tmp_path, clip):
    """Counted before clipping, which turns every gradient NaN once the total is NaN."""

    def corrupt(module):
        net = module.net
        net.fc1.weight.grad[0, 0] = float("nan")
        net.fc1.weight.grad[1, 1] = float("inf")
        net.fc1.bias.grad.fill_(0.5)
        net.fc2.bias.grad.fill_(float("-inf"))

    with pytest.warns(GradientAlert, match="non-finite gradients at step 0 .*fc1 \\(2 values\\)"):
        trainer, _ = fit(
            tmp_path,
            GradientMonitor(histogram_every_n_steps=0, norm_types=[2, "inf", 1]),
            module=lambda: Module(net=Net((2, 3, 1)), after_backward=corrupt),
            max_epochs=1,
            gradient_clip_val=clip,
        )
    values = {tag: v[0] for tag, v in scalars(read_events(trainer.logger.log_dir)).items()}
    assert values["grad_nonfinite/fc1"] == 2
    assert values["grad_nonfinite/fc2"] == 1
    assert values["grad_nonfinite/total"] == 3
    for family in ("grad_norm", "grad_norm_inf", "grad_norm_1"):
        assert math.isnan(values[f"{family}/fc1.weight"])  # NaN wins over Inf, as in torch
        assert values[f"{family}/fc2.bias"] == math.inf
    assert values["grad_norm/fc1.bias"] == pytest.approx(math.sqrt(3 * 0.5**2))
    assert values["grad_norm_inf/fc1.bias"] == 0.5
    assert values["grad_norm_1/fc1.bias"] == pytest.approx(1.5)


def test_a_healthy_run_writes_no_nonfinite_tags_and_no_histograms_of_small_tensors(tmp_path):
    """The tutorial's tensors (1 to 4 values) are under `histogram_min_values` (16): no
    histograms at all, and no `grad_nonfinite/` cards of zeros; their norms are still written."""
    trainer, _ = fit(tmp_path, GradientMonitor(histogram_every_n_steps=1), max_epochs=3)
    acc = read_events(trainer.logger.log_dir)
    values = scalars(acc)
    assert not [t for t in values if t.startswith("grad_nonfinite/")]
    assert histograms(acc) == {}
    for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert sorted(values[f"grad_norm/{n}"]) == sorted(values[f"weight_norm/{n}"]) == [0, 1, 2]


def test_tensors_of_at_least_the_minimum_get_histograms(tmp_path):
    """A 2-8-1 network: fc1.weight has 16 values (the minimum) and gets histograms, bins checked
    against torch.histc in plain PyTorch; the 8- and 1-value tensors get none."""
    recorder = Recorder()
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(histogram_every_n_steps=1),
        module=lambda: Module(net=Net((2, 8, 1))),
        max_epochs=1,
        extra_callbacks=[recorder],
    )
    hists = histograms(read_events(trainer.logger.log_dir))
    assert sorted(hists) == ["grad_hist/fc1.weight", "weight_hist/fc1.weight"]
    torch.manual_seed(0)
    net = Net((2, 8, 1))
    nn.functional.mse_loss(net(X_XOR), Y_XOR).backward()
    assert torch.equal(net.fc1.weight.detach(), recorder.weights[0]["fc1.weight"])
    for kind, t in (("grad", net.fc1.weight.grad), ("weight", net.fc1.weight.detach())):
        h = hists[f"{kind}_hist/fc1.weight"][0]
        lo, hi = t.min().item(), t.max().item()
        assert (h.min, h.max, h.num) == (lo, hi, 16)
        assert list(h.bucket) == [0.0, *torch.histc(t, bins=64, min=lo, max=hi).tolist()]


class HealGradients(pl.Callback):
    """After the monitor has measured (before clipping): NaN and Inf gradients to zero, so that
    the weights stay finite and only the corrupted steps have non-finite gradients."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.parameters():
            p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def test_nonfinite_tags_are_written_at_the_steps_that_had_them(tmp_path):
    def corrupt(module):
        if module.global_step in (2, 4):
            module.net.fc1.weight.grad[0, 0] = float("nan")

    with pytest.warns(GradientAlert, match="non-finite gradients at step 2 .*fc1 \\(1 values?\\)"):
        trainer, _ = fit(
            tmp_path,
            GradientMonitor(histogram_every_n_steps=0),
            module=lambda: Module(after_backward=corrupt),
            max_epochs=6,
            extra_callbacks=[HealGradients()],
            # Clipping (too loose to change anything) makes the monitor count before the hook
            # returns; otherwise it counts after the step, once the gradients are healed.
            gradient_clip_val=1e6,
        )
    values = scalars(read_events(trainer.logger.log_dir))
    assert sorted(values["grad_norm/total"]) == list(range(6))
    assert values["grad_nonfinite/fc1"] == {2: 1.0, 4: 1.0}
    assert values["grad_nonfinite/total"] == {2: 1.0, 4: 1.0}
    assert "grad_nonfinite/fc2" not in values  # fc2's gradients stayed finite


def test_large_tensors_get_the_same_bins_as_torch_histc(tmp_path):
    """Tensors of 4096 values and more are binned with bincount on CPU: the counts, min, max,
    sum and sum of squares of a 2-4096-1 network, against torch.histc in plain PyTorch. fc2.bias,
    one value, is under the default `histogram_min_values` (16): no histogram, its norms only."""
    recorder = Recorder()
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(histogram_every_n_steps=1),
        module=lambda: Module(net=Net((2, 4096, 1))),
        max_epochs=1,
        extra_callbacks=[recorder],
    )
    hists = histograms(read_events(trainer.logger.log_dir))
    torch.manual_seed(0)
    net = Net((2, 4096, 1))
    nn.functional.mse_loss(net(X_XOR), Y_XOR).backward()
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), recorder.weights[0][name])
        for kind, t in (("grad", p.grad), ("weight", p.detach())):
            if t.numel() < 16:
                assert f"{kind}_hist/{name}" not in hists
                continue
            h = hists[f"{kind}_hist/{name}"][0]
            lo, hi = t.min().item(), t.max().item()
            expected = torch.histc(t, bins=64, min=lo, max=hi).tolist()
            assert (h.min, h.max, h.num) == (lo, hi, t.numel())
            assert list(h.bucket) == [0.0, *expected], f"{kind} {name}"
            assert h.sum == pytest.approx(t.double().sum().item(), rel=1e-5, abs=1e-9)
            assert h.sum_squares == pytest.approx(t.double().square().sum().item(), rel=1e-5)


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1.0, 1e4])
def test_bincount_path_equals_torch_histc(scale):
    gen = torch.Generator().manual_seed(int(-math.log10(scale) + 10))
    for n in (4096, 10_000, 100_003):
        for dtype in (torch.float32, torch.float64):
            x = (torch.randn(n, generator=gen) * scale).to(dtype)
            lo, hi = x.min().item(), x.max().item()
            for bins in (1, 7, 64):
                got = _histc_(x.clone(), bins, lo, hi, finite=True)
                assert torch.equal(got.long(), torch.histc(x, bins, lo, hi).long()), (n, bins)
    # With NaN present the formula has no bin for it: histc itself is used, and skips it.
    x = torch.randn(5000, generator=gen)
    x[::7] = float("nan")
    finite = x[x.isfinite()]
    lo, hi = finite.min().item(), finite.max().item()
    assert _histc_(x, 64, lo, hi, finite=False).sum().item() == finite.numel()


def test_nonfinite_stop_names_the_first_bad_step(tmp_path):
    def corrupt(module):
        if module.global_step == 7:
            module.net.fc2.weight.grad[0, 0] = float("nan")

    def module():
        return Module(after_backward=corrupt)

    with pytest.warns(GradientAlert) as record:
        trainer, _ = fit(
            tmp_path,
            GradientMonitor(on_nonfinite="stop", histogram_every_n_steps=0),
            module=module,
            max_epochs=50,
            log_every_n_steps=5,
        )
    messages = alerts_of(record, "non-finite")
    assert len(messages) == 1
    # Read back on the next logging step (9), naming the step it happened at.
    assert "at step 9, first seen at step 7" in messages[0]
    assert "stopping training" in messages[0]
    assert trainer.global_step == 10
    assert (tmp_path / "gradients.json").exists()


# ----------------------------------------------------------------------------------------------
# Alerts
# ----------------------------------------------------------------------------------------------


def test_tutorial_sgd_run_stalls_and_nothing_vanishes(tmp_path):
    """XOR, 2-2-1 sigmoid, MSE, SGD lr 0.01: the loss sits at 0.25, every layer barely moves."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, GradientMonitor(), max_epochs=400, log_every_n_steps=10)
    stall = alerts_of(record, "stalled")
    assert len(stall) == 1, alerts_of(record)
    assert "learning rate looks too small" in stall[0]
    assert "0.25" in stall[0]
    assert alerts_of(record, "vanishing") == []
    assert alerts_of(record, "exploding") == []
    acc = read_events(trainer.logger.log_dir)
    texts = acc.Tensors("alerts/text_summary")
    assert len(texts) == 1 and b"stalled" in texts[0].tensor_proto.string_val[0]
    summary = json.loads((tmp_path / "gradients.json").read_text())
    assert summary["layers"]["total"]["alerts"] == {"stall": 1}


def test_adam_converges_without_any_alert(tmp_path):
    """Adam lr 0.05: the loss reaches exactly 0 and every gradient exactly 0: no alert."""

    def module():
        return Module(optimizer=lambda p: torch.optim.Adam(p, lr=0.05))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(
            tmp_path, GradientMonitor(), module=module, max_epochs=600, log_every_n_steps=2
        )
    values = scalars(read_events(trainer.logger.log_dir))
    assert values["train/loss"][599] == 0.0
    assert values["grad_norm/total"][599] == 0.0
    assert alerts_of(record) == []


def test_vanishing_layer_alerts_once_after_patience(tmp_path):
    def shrink(module):
        for p in module.net.fc1.parameters():
            p.grad.mul_(1e-6)

    def module():
        return Module(after_backward=shrink)

    with pytest.warns(GradientAlert) as record:
        fit(tmp_path, GradientMonitor(vanishing_patience=3), module=module, max_epochs=30)
    vanishing = alerts_of(record, "vanishing")
    assert len(vanishing) == 1
    assert "at step 2: fc1" in vanishing[0] and "fc2" not in vanishing[0]


def test_exploding_total_alerts_once_per_episode(tmp_path):
    def module():
        return Module(loss_scale=lambda step: 1e4 if step >= 20 else 1.0)

    with pytest.warns(GradientAlert) as record:
        fit(tmp_path, GradientMonitor(exploding_window=10), module=module, max_epochs=40)
    exploding = alerts_of(record, "exploding")
    assert len(exploding) == 1
    assert "at step 20" in exploding[0]


# ----------------------------------------------------------------------------------------------
# Loggers
# ----------------------------------------------------------------------------------------------


def test_csv_logger_gets_scalars_and_one_histogram_warning(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, GradientMonitor(), logger=logger, max_epochs=30)
    assert len(alerts_of(record, "histograms need a TensorBoardLogger")) == 1
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_norm/total")]
    assert [int(r["step"]) for r in rows] == list(range(30))
    # CSV keeps Python's repr: the exact float, not rounded.
    first = plain_sgd(1, lr=0.01)[0]
    assert float(rows[0]["grad_norm/total"]) == pytest.approx(first[1], rel=1e-6)


def test_no_logger_says_so_once_and_stays_out_of_the_way(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, GradientMonitor(), logger=False, max_epochs=5)
    assert len(alerts_of(record, "no logger")) == 1
    assert len(alerts_of(record)) == 1
    assert not (tmp_path / "gradients.json").exists()


# ----------------------------------------------------------------------------------------------
# After training, and checkpoints
# ----------------------------------------------------------------------------------------------


def test_summary_files_agree_with_the_event_files(tmp_path, capsys):
    monitor = GradientMonitor()
    trainer, _ = fit(tmp_path, monitor, max_epochs=20, log_every_n_steps=2)
    values = scalars(read_events(trainer.logger.log_dir))
    summary = json.loads((tmp_path / "gradients.json").read_text())
    for layer in ("fc1", "fc2", "total"):
        series = [values[f"grad_norm/{layer}"][s] for s in sorted(values[f"grad_norm/{layer}"])]
        row = summary["layers"][layer]
        assert row["first"] == pytest.approx(series[0], rel=1e-6)
        assert row["last"] == pytest.approx(series[-1], rel=1e-6)
        assert row["min"] == pytest.approx(min(series), rel=1e-6)
        assert row["max"] == pytest.approx(max(series), rel=1e-6)
    assert summary["layers"]["fc1"]["last_update_ratio"] == pytest.approx(
        values["update_ratio/fc1"][19], rel=1e-6
    )
    assert summary["steps"] == list(range(1, 20, 2))
    # The callback records; the report draws what it recorded.
    assert not (tmp_path / "grad_flow.png").exists()
    png = save_grad_flow(monitor.history, tmp_path / "grad_flow.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "fc1" in out and "fc2" in out and "Gradient norms" in out


def test_state_dict_is_plain_and_round_trips(tmp_path):
    def module():
        return Module(loss_scale=lambda step: 1e4 if step >= 12 else 1.0)

    monitor = GradientMonitor(exploding_window=5)
    with pytest.warns(GradientAlert):
        fit(tmp_path, monitor, module=module, max_epochs=20)
    state = monitor.state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = GradientMonitor(exploding_window=5)
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == state
    assert fresh.summary() == monitor.summary()
    assert state["alert_counts"]["total"] == {"exploding": 1}


def test_resumed_run_continues_the_same_monitor_state(tmp_path):
    def run(path, epochs, ckpt=None, monitor=None):
        torch.manual_seed(0)
        monitor = monitor or GradientMonitor()
        trainer = make_trainer(path, monitor, max_epochs=epochs)
        trainer.fit(Module(), xor_loader(), ckpt_path=ckpt)
        return trainer, monitor

    _, whole = run(tmp_path / "whole", 30)
    first, _ = run(tmp_path / "first", 15)
    first.save_checkpoint(tmp_path / "half.ckpt")
    _, resumed = run(tmp_path / "second", 30, ckpt=tmp_path / "half.ckpt")
    assert resumed.summary()["steps"] == whole.summary()["steps"] == list(range(30))
    a = resumed.state_dict()["history"]["layers"]["fc1"]
    b = whole.state_dict()["history"]["layers"]["fc1"]
    assert a == pytest.approx(b, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# GPU: AMP with a fused optimizer (Lightning does not unscale), and no sync on other steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("init_scale", [65536.0, 256.0])
def test_fp16_fused_adam_logs_unscaled_norms(tmp_path, init_scale):
    """At Lightning's default scale (65536) fc2's fp16 gradients overflow on an H200's first step:
    the scaler skips the step and halves its scale inside it. The finite norms must still be
    divided by the scale the gradients were made with; only the overflowed ones may be inf."""
    module = Module(optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, fused=True))
    torch.manual_seed(0)
    reference = copy.deepcopy(module.net).cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)],
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[GradientMonitor()],
        max_epochs=1,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, xor_loader())
    values = scalars(read_events(trainer.logger.log_dir))
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.mse_loss(reference(X_XOR.cuda()), Y_XOR.cuda())
    loss.backward()
    assert math.isfinite(values["grad_norm/fc1.weight"][0])  # the tutorial's tensor
    for n, p in reference.named_parameters():
        logged = values[f"grad_norm/{n}"][0]
        if math.isfinite(logged) or init_scale < 65536:
            assert logged == pytest.approx(p.grad.norm().item(), rel=1e-3), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("every_step", [False, True])
def test_no_host_sync_on_other_steps_on_gpu(tmp_path, every_step):
    """Between logging steps the monitor never waits for the GPU: with every_step, each step's
    norms are taken and kept on the device (and its loss after the step)."""
    monitor = GradientMonitor(log_every_n_steps=5, every_step=every_step)

    def strict(hook):
        def checked(trainer, *args):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            if (step + 1) % 5:
                torch.cuda.set_sync_debug_mode("error")
            try:
                hook(trainer, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return checked

    monitor.on_before_optimizer_step = strict(monitor.on_before_optimizer_step)
    monitor.on_train_batch_end = strict(monitor.on_train_batch_end)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        max_epochs=12,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), xor_loader())
    written = sorted(scalars(read_events(trainer.logger.log_dir))["grad_norm/total"])
    assert written == (list(range(12)) if every_step else [4, 9])
