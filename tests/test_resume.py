"""Interrupted runs keep their work and resume exactly where they stopped, in the same run."""

import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import wait_for
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.checkpoints import AtomicCheckpointIO, RunCheckpoint
from gradwatch.data import InMemoryDataModule
from gradwatch.model import MLPModule
from gradwatch.train import train

# Long enough to be interrupted; checkpoints often enough to be caught by a hard kill.
RUN = ["optimizer=adam", "trainer.max_epochs=4000", "callbacks.checkpoint.every_n_train_steps=200"]
RUN += ["print_every=0", "trainer.log_every_n_steps=20"]


def start(args: list[str], root: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "gradwatch.train", *args, f"paths.root={root}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def interrupt(signum: int, root: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start the run, let it write its first periodic checkpoint, then send `signum`."""
    process = start(RUN, root)
    ckpt = wait_for("xor/*/checkpoints/last.ckpt", root)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    return process, output, ckpt.parent.parent


def uninterrupted_weights(make_cfg) -> dict[str, torch.Tensor]:
    cfg = make_cfg(*RUN)
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    return torch.load(ckpt, weights_only=True)["state_dict"]


def assert_resumes_exactly(run_dir: Path, root: Path, expected: dict[str, torch.Tensor]) -> None:
    resumed = start([*RUN, f"ckpt_path={run_dir}"], root)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    # The same run directory, not a new one.
    assert list((root / "xor").iterdir()) == [run_dir]
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 4000
    for name, value in expected.items():
        assert torch.equal(final["state_dict"][name], value), name
    # One TensorBoard curve: every logging step exactly once, none missing.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(19, 4000, 20))


def test_ctrl_c_saves_flushes_and_resumes_bit_for_bit(tmp_path, make_cfg):
    process, output, run_dir = interrupt(signal.SIGINT, tmp_path / "runs")
    assert process.returncode != 0
    assert f"Resume with: make train ckpt_path={run_dir}" in output
    stopped = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert 0 < stopped["global_step"] < 4000
    # Event files were flushed: what was logged before the stop is readable now.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars("train/loss")[-1].step >= 199
    assert_resumes_exactly(run_dir, tmp_path / "runs", uninterrupted_weights(make_cfg))


@pytest.mark.slow
def test_sigterm_saves_and_exits_non_zero(tmp_path):
    process, output, run_dir = interrupt(signal.SIGTERM, tmp_path / "runs")
    assert process.returncode != 0
    assert "SIGTERM received" in output and "Resume with:" in output


@pytest.mark.slow
def test_hard_kill_keeps_the_last_periodic_checkpoint_whole(tmp_path, make_cfg):
    process, _, run_dir = interrupt(signal.SIGKILL, tmp_path / "runs")
    assert process.returncode == -signal.SIGKILL
    kept = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert kept["global_step"] % 200 == 0 and kept["global_step"] > 0
    assert_resumes_exactly(run_dir, tmp_path / "runs", uninterrupted_weights(make_cfg))


def test_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def dies_halfway(checkpoint, target, *args, **kwargs):
        target.write(b"half a checkp")  # Lightning serializes into a buffer, then a file
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 1}


def test_a_stop_on_a_logging_step_keeps_that_steps_values(tmp_path):
    """Lightning writes a step's `self.log` values after on_train_batch_end: a stop asked for
    during logging step 19 saves step 20 and ends the run only once step 19's values are written,
    so the resumed run (which starts at step 20) continues one curve with no step missing."""
    checkpoint = RunCheckpoint(tmp_path / "checkpoints", every_n_train_steps=1000)

    class CtrlCAtStep19(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 19:
                checkpoint.stop_signal = signal.SIGINT

    trainer = pl.Trainer(
        max_epochs=100,
        log_every_n_steps=20,
        callbacks=[CtrlCAtStep19(), checkpoint],
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful interrupt: exit 1
            trainer.fit(MLPModule(), datamodule=InMemoryDataModule("xor"))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C on its way out
    assert torch.load(checkpoint.last_path, weights_only=True)["global_step"] == 20
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [19]
