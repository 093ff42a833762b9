"""GradientMonitor under DDP (2 CPU processes, gloo): rank zero writes once, and the values are the
single-process run's on the same data (DDP averages the two halves' gradients)."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.monitor import GradientMonitor


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(batch_size):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def run(path, monitor=None, **kwargs):
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(path, name="tb", version=0),
        callbacks=[monitor or GradientMonitor(histogram_every_n_steps=2)],
        max_epochs=4,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path,
        **kwargs,
    )
    # The same 8 samples: one batch of 8, or a batch of 4 on each of two ranks.
    trainer.fit(Module(), data(8 if kwargs.get("devices", 1) == 1 else 4))
    acc = EventAccumulator(str(path / "tb" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_ddp_rank_zero_writes_the_single_process_values_once(tmp_path):
    single = run(tmp_path / "single", devices=1)
    ddp = run(tmp_path / "ddp", devices=2, strategy="ddp_spawn")
    assert len(list((tmp_path / "ddp" / "tb" / "version_0").glob("events.out.tfevents.*"))) == 1
    tags = [t for t in single.Tags()["scalars"] if t.startswith(("grad_norm", "update_ratio"))]
    assert "grad_norm/fc1.weight" in tags and "update_ratio/fc2" in tags
    for tag in tags:
        a = [(e.step, e.value) for e in single.Scalars(tag)]
        b = [(e.step, e.value) for e in ddp.Scalars(tag)]
        assert [s for s, _ in b] == [0, 1, 2, 3], tag  # once per step: rank zero only
        for (_, va), (_, vb) in zip(a, b, strict=True):
            assert math.isclose(va, vb, rel_tol=1e-5), (tag, va, vb)
    summary = json.loads((tmp_path / "ddp" / "gradients.json").read_text())
    assert summary["steps"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_ddp_every_step_is_the_single_process_every_step(tmp_path):
    """every_step under DDP: the all-reduced gradients' norms of every step, written by rank
    zero once, equal to the single process's at log_every_n_steps=1."""
    single = run(tmp_path / "single", devices=1)
    monitor = GradientMonitor(every_step=True, log_every_n_steps=3, histogram_every_n_steps=0)
    ddp = run(tmp_path / "ddp", monitor=monitor, devices=2, strategy="ddp_spawn")
    tags = [t for t in single.Tags()["scalars"] if t.startswith("grad_norm")]
    assert {"grad_norm/total", "grad_norm/fc1.weight", "grad_norm_log10/fc2"} <= set(tags)
    for tag in tags:
        a = [(e.step, e.value) for e in single.Scalars(tag)]
        b = [(e.step, e.value) for e in ddp.Scalars(tag)]
        assert [s for s, _ in b] == [0, 1, 2, 3], tag
        for (_, va), (_, vb) in zip(a, b, strict=True):
            assert math.isclose(va, vb, rel_tol=1e-5), (tag, va, vb)
