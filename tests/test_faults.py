"""Faults: a checkpoint that is missing, corrupted, truncated or unsafe gets a clear error before
training; checkpoints load with torch's safe loading; a disk that fills up mid-run keeps what
was written before whole."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config

from gradwatch.resume import check_checkpoint, resolve_checkpoint
from gradwatch.train import train
from gradwatch.validate import ConfigError
from gradwatch.write_errors import describe_write_error


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real three-epoch run: its directory, with checkpoints/last.ckpt."""
    run_dir = tmp_path_factory.mktemp("outputs") / "xor" / "2020-01-01_00-00-00_000000_1"
    train(compose_config(["trainer.max_epochs=3", "print_every=0"], run_dir))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


def copy_run(run: Path, root: Path, stamp: str) -> Path:
    target = root / "xor" / stamp
    shutil.copytree(run, target)
    return target


# --- safe loading --------------------------------------------------------------------------


def test_a_real_checkpoint_loads_with_weights_only(finished_run):
    path = finished_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["epoch"] == 3
    assert set(checkpoint["state_dict"]) == {
        "net.fc1.weight",
        "net.fc1.bias",
        "net.fc2.weight",
        "net.fc2.bias",
    }
    # The optimizer config is kept as plain data, never as a pickled functools.partial.
    assert checkpoint["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.SGD"
    assert check_checkpoint(path)["global_step"] == 3


def test_a_checkpoint_with_a_pickled_callable_is_refused(tmp_path, finished_run):
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hook"] = shutil.rmtree  # what an untrusted checkpoint could smuggle in
    path = tmp_path / "unsafe.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(
        ConfigError, match=r"pickled Python object \(shutil.rmtree\) that safe loading"
    ):
        resolve_checkpoint(str(path), tmp_path, "xor")


# --- resolving ckpt_path -------------------------------------------------------------------


def test_none_is_a_fresh_start(tmp_path):
    assert resolve_checkpoint(None, tmp_path, "xor") is None


def test_a_file_a_run_directory_and_last(tmp_path, finished_run):
    older = copy_run(finished_run, tmp_path, "2021-01-01_00-00-00_000000_1")
    newer = copy_run(finished_run, tmp_path, "2022-01-01_00-00-00_000000_1")
    os.utime(older / "checkpoints" / "last.ckpt", (1e9, 1e9))
    # A run that started but wrote no checkpoint (this run's own new directory) does not count.
    (tmp_path / "xor" / "2023-01-01_00-00-00_000000_1").mkdir()
    ckpt = str(older / "checkpoints" / "last.ckpt")
    assert resolve_checkpoint(ckpt, tmp_path, "xor") == ckpt
    assert resolve_checkpoint(str(older), tmp_path, "xor") == ckpt
    assert resolve_checkpoint("last", tmp_path, "xor") == str(newer / "checkpoints" / "last.ckpt")


def test_last_without_any_checkpoint(tmp_path):
    (tmp_path / "xor" / "2021-01-01_00-00-00_000000_1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"ckpt_path=last but no run under .*xor has"):
        resolve_checkpoint("last", tmp_path, "xor")
    with pytest.raises(ConfigError, match="ckpt_path=last but no run under"):
        resolve_checkpoint("last", tmp_path / "nowhere", "xor")


def test_missing_file_and_folder_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path=.*nope.ckpt does not exist: give a .ckpt"):
        resolve_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path, "xor")
    with pytest.raises(ConfigError, match="is a folder without checkpoints/last.ckpt"):
        resolve_checkpoint(str(tmp_path), tmp_path, "xor")


# --- damaged files -------------------------------------------------------------------------


def test_garbage_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(os.urandom(512))
    with pytest.raises(ConfigError) as error:
        resolve_checkpoint(str(path), tmp_path, "xor")
    assert str(error.value).startswith(f"ckpt_path={path} is corrupted, truncated or not a")
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_a_truncated_checkpoint(tmp_path, finished_run, keep):
    run = copy_run(finished_run, tmp_path, "2021-01-01_00-00-00_000000_1")
    path = run / "checkpoints" / "last.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConfigError, match="is corrupted, truncated or not a checkpoint"):
        resolve_checkpoint(str(run), tmp_path, "xor")
    with pytest.raises(ConfigError, match=f"ckpt_path=last \\({path}\\) is corrupted"):
        resolve_checkpoint("last", tmp_path, "xor")


def test_a_tensor_file_is_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(
        ConfigError, match="not a Lightning checkpoint: it lacks global_step, epoch"
    ):
        resolve_checkpoint(str(path), tmp_path, "xor")


def test_check_config_resolves_ckpt_path(finished_run, tmp_path):
    from gradwatch.preflight import check_config

    root = tmp_path / "outputs"
    run = copy_run(finished_run, root, "2021-01-01_00-00-00_000000_1")
    cfg = compose_config([f"paths.root={root}", "ckpt_path=last"], root / "xor" / "new")
    assert check_config(cfg) == str(run / "checkpoints" / "last.ckpt")


def test_a_truncated_checkpoint_on_the_command_line(tmp_path, finished_run):
    root = tmp_path / "outputs"
    run = copy_run(finished_run, root, "2021-01-01_00-00-00_000000_1")
    path = run / "checkpoints" / "last.ckpt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.train", f"ckpt_path={run}", f"paths.root={root}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    assert f"Error in config: ckpt_path={run} ({path}) is corrupted, truncated or not a" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# --- a disk that fills up mid-run ----------------------------------------------------------


def test_disk_full_at_a_later_checkpoint_keeps_the_earlier_one(tmp_path, monkeypatch):
    # Every checkpoint write ends in shutil.move (fsspec's commit of its temporary file): the
    # second one fails as a full disk would.
    real_move, moves = shutil.move, []

    def move(src, dst, *args, **kwargs):
        moves.append(dst)
        if len(moves) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_move(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "move", move)
    run_dir = tmp_path / "run"
    cfg = compose_config(
        ["trainer.max_epochs=6", "callbacks.checkpoint.every_n_train_steps=2", "print_every=0"],
        run_dir,
    )
    with pytest.raises(OSError) as raised:
        train(cfg)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # What was written before the failure is whole and readable.
    assert check_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert (run_dir / "config.yaml").read_text().startswith("name: xor")
    assert list(run_dir.glob("events.out.tfevents.*"))
    message = describe_write_error(raised.value, run_dir)
    assert "No space left on device (the disk is full)" in message
    assert f"(step 2) is whole: resume with ckpt_path={run_dir}" in message


def test_describe_write_error_with_a_damaged_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"half")
    error = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))
    message = describe_write_error(error, tmp_path)
    assert "(the folder is read-only)" in message and "is damaged" in message


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB filesystem (tmpfs), where a run fills the disk within its first second."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_naming_the_file(small_disk):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.train", f"paths.root={small_disk}", "print_every=0"]
        + ["trainer.max_epochs=3000", "callbacks.checkpoint.every_n_train_steps=500"]
        # Histograms of every tensor every 50 steps: the event file grows by about 80 KB in 500
        # steps, so after the first checkpoint (about 18 KB, at step 500, with about 110 KB
        # used) it fills the disk before the second one, which needs room for its new copy
        # beside the old. (The checkpoint meeting the full disk is tested on its own above.)
        + ["callbacks.gradient_monitor.histogram_min_values=1"]
        + ["callbacks.gradient_monitor.histogram_every_n_steps=50"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    # Not TensorBoard's writer thread's traceback: one line, naming the event file.
    assert "Traceback" not in out and "Exception in thread" not in out, out
    (run_dir,) = (small_disk / "xor").iterdir()
    (event_file,) = run_dir.glob("events.out.tfevents.*")
    assert f"Error writing the run: cannot write {event_file}: No space left on device" in out
    # The last periodic checkpoint written before the disk filled (how far the run got depends
    # on the sizes of its files) is whole, and the message says which step it holds.
    step = check_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert step > 0 and step % 500 == 0
    assert f"(step {step}) is whole: resume with ckpt_path={run_dir}" in out


def test_a_failed_copy_into_the_run_names_the_runs_file(tmp_path):
    # A checkpoint is written to a temporary file elsewhere, then copied into the run: shutil
    # names the temporary source first and the run's file second.
    target = tmp_path / "checkpoints" / "last.ckpt.tmp"
    error = OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpabc123", None, str(target))
    message = describe_write_error(error, tmp_path)
    assert message.startswith(f"cannot write {target}: No space left on device")
