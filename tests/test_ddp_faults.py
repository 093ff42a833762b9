"""A stop signal under DDP (`trainer=ddp trainer.devices=2`, gloo) behaves as in one process:
SIGTERM to the process the user started (the launcher, rank zero: Lightning's launcher does not
pass it on to rank one) or Ctrl-C to the whole process group saves `last.ckpt` at a step
boundary on every rank's agreement, prints the resume hint, exits 1 with no traceback from any
rank, and the run resumes with the same command into one TensorBoard curve."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.train import train

DDP = ["trainer=ddp", "trainer.devices=2"]
RUN = ["trainer.max_epochs=1000", "trainer.log_every_n_steps=20", "print_every=0"]
RUN += ["callbacks.checkpoint.every_n_train_steps=200"]


def start(args: list[str], root: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "gradwatch.train", *DDP, *RUN, *args, f"paths.root={root}"]
    # A session of its own: Ctrl-C in a terminal is SIGINT to the whole process group.
    return subprocess.Popen(
        command,
        cwd=root.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(signum: int, to_group: bool, root: Path) -> tuple[str, Path, int]:
    """Start the DDP run, let it write its first periodic checkpoint (training is under way on
    both ranks), send `signum`; return the output, the run directory and the saved step."""
    process = start([], root)
    try:
        ckpt = wait_for("xor/*/checkpoints/last.ckpt", root)
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        # Returns once every rank has closed the output: no rank is left behind.
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1, output
    assert "Traceback" not in output and "Error" not in output, output
    name = signal.Signals(signum).name
    saved = re.findall(rf"{name} received: saved {re.escape(str(ckpt))} at step (\d+)\.", output)
    assert len(saved) == 1, output  # said once, by rank zero
    run_dir = ckpt.parent.parent
    assert f"Training stopped early. Resume with: make train ckpt_path={run_dir}" in output
    step = int(saved[0])
    # At a step boundary: the checkpoint holds the step the message names, and training had
    # gone on after the first periodic checkpoint.
    assert torch.load(ckpt, weights_only=True)["global_step"] == step
    assert 200 <= step < 1000
    return output, run_dir, step


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_stops_and_resumes_into_one_curve(tmp_path, make_cfg):
    root = tmp_path / "runs"
    _, run_dir, _ = stop(signal.SIGTERM, to_group=False, root=root)

    resumed = start([f"ckpt_path={run_dir}"], root)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert list((root / "xor").iterdir()) == [run_dir]
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 1000
    # One TensorBoard curve: every logging step exactly once, none missing.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("train/loss", "grad_norm/total"):
        assert [e.step for e in events.Scalars(tag)] == list(range(19, 1000, 20)), tag
    # The stopped and resumed DDP run ends where one uninterrupted process does (DDP averages
    # the two half-batches' gradients: equal up to float rounding).
    cfg = make_cfg(*RUN)
    train(cfg)
    single = torch.load(Path(cfg.paths.output_dir, "checkpoints/last.ckpt"), weights_only=True)
    for name, value in single["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ctrl_c_reaching_every_rank_stops_them_at_one_step(tmp_path):
    stop(signal.SIGINT, to_group=True, root=tmp_path / "runs")
