"""The cheaper equivalents of gradwatch.overhead give what Lightning's and TensorBoard's own do."""

import os

import lightning.pytorch as pl
import pytest
from lightning.pytorch.profilers import PassThroughProfiler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_crc
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from gradwatch.data import InMemoryDataModule
from gradwatch.model import MLPModule
from gradwatch.monitor import GradientMonitor
from gradwatch.overhead import (
    STEP_HOOKS,
    NoProfiler,
    SkipUnusedBatchHooks,
    masked_crc32c,
    skip_unused_step_hooks,
    use_fast_crc32c,
)
from gradwatch.train import build_trainer, train


@pytest.mark.parametrize("size", [0, 1, 3, 8, 9, 100, 4096, 9001])
def test_masked_crc32c_equals_tensorboards_own(size):
    data = os.urandom(size)
    assert masked_crc32c(data) == tensorboard_crc(data)


def test_checksums_of_known_data():
    # CRC32C("123456789") = 0xE3069283 (RFC 3720's check value), then TFRecord's mask.
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_files_written_with_the_fast_checksum_read_back(tmp_path):
    assert use_fast_crc32c()  # google-crc32c is a dependency: its C extension must be there
    assert record_writer.masked_crc32c is masked_crc32c
    writer = SummaryWriter(tmp_path)
    for step in range(5):
        writer.add_scalar("x", step * 0.5, step)
    writer.close()
    # TensorBoard's reader drops any record whose checksum (its own pure-Python CRC) differs.
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(s, s * 0.5) for s in range(5)]


def test_no_profiler_records_nothing_and_nests():
    profiler = NoProfiler()
    assert isinstance(profiler, PassThroughProfiler)
    with profiler.profile("outer") as outer, profiler.profile("inner") as inner:
        assert outer is None and inner is None
    assert profiler.summary() == ""


def test_trainer_gets_no_profiler_unless_one_is_asked_for(make_cfg, tmp_path):
    assert type(build_trainer(make_cfg(), tmp_path).profiler) is NoProfiler
    train(make_cfg("trainer.profiler=simple", "trainer.max_epochs=20"))
    report = (tmp_path / "run" / "fit-profiler.txt").read_text()
    assert "FIT Profiler Report" in report and "run_training_batch" in report


def fit_bare(tmp_path, datamodule, epochs, callbacks=()):
    """The tutorial's MLPModule on `datamodule` in a Trainer with nothing else attached."""
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(MLPModule(), datamodule=datamodule)
    return trainer


class CountingDataModule(InMemoryDataModule):
    """Overrides a batch-transfer hook: Lightning must keep calling it."""

    calls = 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        CountingDataModule.calls += 1
        return batch


@pytest.mark.parametrize("datamodule_class", [InMemoryDataModule, CountingDataModule])
def test_batch_hooks_are_skipped_only_where_the_datamodule_has_none(tmp_path, datamodule_class):
    datamodule = datamodule_class()
    trainer = fit_bare(tmp_path, datamodule, epochs=3, callbacks=[SkipUnusedBatchHooks()])
    selector = trainer._data_connector._datahook_selector
    if datamodule_class is CountingDataModule:
        assert selector.datamodule is datamodule and CountingDataModule.calls == 3
    else:
        assert selector.datamodule is None  # nothing to ask: the module's own (default) hooks
    assert trainer.global_step == 3


def test_unused_step_hooks_are_skipped_and_used_ones_still_run(tmp_path):
    class Counting(pl.Callback):
        batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            Counting.batches += 1

    callback = skip_unused_step_hooks(Counting())
    assert callback.on_train_epoch_start is None and callback.on_before_backward is None
    assert callback.on_train_batch_end is not None  # its own hook stays
    assert callback.state_dict() == {}  # hooks Lightning calls directly are never touched
    fit_bare(tmp_path, InMemoryDataModule(), epochs=4, callbacks=[callback])
    assert Counting.batches == 4


def test_gradwatch_callbacks_skip_the_step_hooks_they_do_not_use(make_cfg, tmp_path):
    trainer = build_trainer(make_cfg(), tmp_path)
    monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
    assert callable(monitor.on_before_optimizer_step) and callable(monitor.on_train_batch_end)
    for callback in trainer.callbacks:
        for name in STEP_HOOKS:
            overridden = getattr(type(callback), name) is not getattr(pl.Callback, name)
            assert callable(getattr(callback, name)) == overridden, (callback, name)
