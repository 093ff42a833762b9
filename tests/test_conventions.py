"""Lightning's conventions kept: the training metrics reach `trainer.callback_metrics` (so
EarlyStopping and ModelCheckpoint can monitor them), and the library changes nothing outside
itself: every process-wide speed-up is the command line's, and `speedups=false` turns them off."""

import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import PassThroughProfiler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as _tensorboard_crc
from tensorboard.summary.writer import record_writer

from gradwatch.data import InMemoryDataModule
from gradwatch.model import MLPModule
from gradwatch.monitor import GradientMonitor
from gradwatch.overhead import STEP_HOOKS, NoProfiler, SkipUnusedBatchHooks, masked_crc32c
from gradwatch.train import build_trainer

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.05}


class LossRecorder(pl.Callback):
    """Every step's loss as the module returned it, and what callback_metrics held then."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.seen: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.losses[step] = outputs["loss"].item()
        if "train/loss" in trainer.callback_metrics:
            self.seen[step] = trainer.callback_metrics["train/loss"].item()


def fit(tmp_path, callbacks, epochs=300, every=50, optimizer=ADAM):
    torch.manual_seed(0)
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_epochs=epochs,
        log_every_n_steps=every,
        callbacks=[*callbacks, recorder],
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(MLPModule(optimizer=optimizer), datamodule=InMemoryDataModule("xor"))
    return trainer, recorder


def written_losses(tmp_path) -> dict[int, float]:
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def test_train_loss_is_in_callback_metrics_on_the_steps_it_is_written(tmp_path):
    _, recorder = fit(tmp_path, [], epochs=120, every=50)
    written = written_losses(tmp_path)
    assert sorted(written) == [49, 99]
    for step, value in written.items():
        assert recorder.seen[step] == pytest.approx(recorder.losses[step], rel=1e-6)
        assert value == pytest.approx(recorder.losses[step], rel=1e-6)


def test_early_stopping_on_train_loss_stops_where_the_loss_stops_improving(tmp_path):
    """The tutorial's one-step epochs: EarlyStopping checks at every epoch's end, logging every
    50 steps. It sees each step's own loss and stops `patience` epochs after the last step that
    improved on the best by `min_delta` (worked out here from the losses themselves)."""
    patience, min_delta = 60, 1e-4
    stop = EarlyStopping(monitor="train/loss", patience=patience, min_delta=min_delta)
    trainer, recorder = fit(tmp_path, [stop], epochs=2000)
    assert trainer.current_epoch < 2000
    best, waited, expected_stop = float("inf"), 0, None
    for step in sorted(recorder.losses):
        assert recorder.seen[step] == pytest.approx(recorder.losses[step], rel=1e-6)
        if recorder.losses[step] < best - min_delta:
            best, waited = recorder.losses[step], 0
        else:
            waited += 1
            if waited >= patience:
                expected_stop = step
                break
    assert stop.stopped_epoch == expected_stop
    # What the loggers got is still Lightning's cadence.
    written = written_losses(tmp_path)
    assert written and all((step + 1) % 50 == 0 for step in written)


def test_model_checkpoint_on_train_loss_keeps_the_lowest_written_loss(tmp_path):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="train/loss", mode="min", every_n_train_steps=50
    )
    _, recorder = fit(tmp_path, [checkpoint], epochs=400)
    saved = {step: recorder.losses[step] for step in range(49, 400, 50)}
    best_step = min(saved, key=saved.get)
    assert checkpoint.best_model_score.item() == pytest.approx(saved[best_step], rel=1e-6)
    assert checkpoint.best_model_path.endswith(f"step={best_step + 1}.ckpt")


def test_the_library_changes_nothing_outside_itself(tmp_path):
    checksum, showwarning = record_writer.masked_crc32c, warnings.showwarning
    monitor = GradientMonitor(histogram_every_n_steps=10)
    fit(tmp_path, [monitor], epochs=60, every=5)
    assert record_writer.masked_crc32c is checksum
    assert warnings.showwarning is showwarning
    for name in STEP_HOOKS:  # every hook is the class's own: Lightning calls it on every step
        assert getattr(monitor, name) == getattr(type(monitor), name).__get__(monitor)


def test_importing_the_entry_point_changes_no_warning_setting():
    code = (
        "import hydra, lightning.pytorch, matplotlib, tensorboard, torch.utils.tensorboard\n"
        "import warnings; filters = list(warnings.filters); show = warnings.showwarning\n"
        "import gradwatch.train\n"
        "assert warnings.filters == filters and warnings.showwarning is show\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("speedups", ["true", "false"])
def test_speedups_are_all_on_or_all_off(make_cfg, tmp_path, speedups):
    """The command line's build_trainer applies every speed-up, or with speedups=false none:
    TensorBoard's checksum function, the profiler, the skipped hooks."""
    on = speedups == "true"
    tensorboards_own = record_writer.masked_crc32c
    try:
        record_writer.masked_crc32c = tensorboards_own = _tensorboard_crc
        trainer = build_trainer(make_cfg(f"speedups={speedups}"), tmp_path)
        assert (record_writer.masked_crc32c is masked_crc32c) == on
        assert (record_writer.masked_crc32c is tensorboards_own) != on
        assert isinstance(trainer.profiler, NoProfiler) == on
        assert isinstance(trainer.profiler, PassThroughProfiler)
        assert any(isinstance(c, SkipUnusedBatchHooks) for c in trainer.callbacks) == on
        monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        assert (monitor.on_train_epoch_start is None) == on
    finally:
        record_writer.masked_crc32c = tensorboards_own
