"""A resume never damages its run: what cannot continue the run is refused in a line before
anything is written, a completed run is left as it is, one process trains a run at a time, and
the run's records say what trained it."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.preflight import check_config, check_fits_in_memory
from gradwatch.resume import (
    RunComplete,
    RunInUse,
    RunLock,
    check_checkpoint,
    epochs_done,
    merged_overrides,
)
from gradwatch.train import train
from gradwatch.validate import ConfigError

# The tutorial, short, with its own cadence: a resume must keep every one of these.
RUN = ["trainer.max_epochs=60", "callbacks.checkpoint.every_n_train_steps=20", "print_every=0"]
ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}


def command(args: list[str], root: Path) -> list[str]:
    return [sys.executable, "-m", "gradwatch.train", *args, f"paths.root={root}"]


def run(args: list[str], root: Path) -> tuple[int, str]:
    done = subprocess.run(
        command(args, root), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def run_all(commands: list[list[str]], root: Path) -> list[tuple[int, str]]:
    """Several command lines at once (each process mostly imports): their codes and outputs."""
    processes = [
        subprocess.Popen(
            command(args, root),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in commands
    ]
    return [(p.wait(timeout=300), p.stdout.read()) for p in processes]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(paths.root, run directory) of a finished 60-epoch run made by the command line."""
    root = tmp_path_factory.mktemp("runs")
    code, out = run(RUN, root)
    assert code == 0, out
    (run_dir,) = (root / "xor").iterdir()
    return root, run_dir


@pytest.fixture
def copy_of(tmp_path, finished):
    """A fresh copy of the finished run, under its own paths.root: (root, run directory)."""
    root = tmp_path / "runs"
    _, source = finished
    target = root / "xor" / source.name
    shutil.copytree(source, target)
    return root, target


def test_a_resume_that_cannot_continue_the_run_is_refused_and_changes_nothing(finished, tmp_path):
    refusals = {
        # Another optimizer, another network, fewer epochs than done, a changed setting that
        # Lightning would silently ignore (lr), a changed seed and cadence.
        "optimizer=adam": "optimizer._target_=torch.optim.SGD (now torch.optim.Adam)",
        "model.layer_sizes=[2,4,1]": "model.layer_sizes=[2,2,1] (now [2,4,1])",
        "trainer.max_epochs=30": "trainer.max_epochs=30 but",
        "optimizer.lr=0.5": "optimizer.lr=0.01 (now 0.5)",
        "seed=3": "seed=0 (now 3)",
        "callbacks.checkpoint.every_n_train_steps=7": "every_n_train_steps=20 (now 7)",
    }
    # One copy of the run each: two resumes of one run at once are refused by its lock.
    runs = [tmp_path / str(i) / "xor" / finished[1].name for i in range(len(refusals))]
    for run_dir in runs:
        shutil.copytree(finished[1], run_dir)
    before = snapshot(finished[1])
    processes = [
        subprocess.Popen(
            command([f"ckpt_path={run_dir}", override], run_dir.parents[1]),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for run_dir, override in zip(runs, refusals, strict=True)
    ]
    for process, run_dir, (override, needle) in zip(processes, runs, refusals.items(), strict=True):
        code, out = process.wait(timeout=300), process.stdout.read()
        assert code == 2, (override, out)
        assert out.count("\n") == 1 and out.startswith("Error in config: "), (override, out)
        assert needle in out, (override, out)
        assert "Traceback" not in out and "Resume with" not in out, out
        # Byte for byte: config.yaml, overrides.yaml, the event file (no purge), .hydra/...
        assert snapshot(run_dir) == before, override
        assert list(run_dir.parent.iterdir()) == [run_dir]


def test_a_bare_checkpoint_file_is_checked_against_the_model_and_optimizer(copy_of, tmp_path):
    # No config.yaml beside it: the checkpoint's own record and tensors are compared.
    root, run_dir = copy_of
    bare = tmp_path / "elsewhere.ckpt"
    bare.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    cases = {
        "optimizer=adam": "optimizer._target_=torch.optim.SGD (now torch.optim.Adam)",
        "optimizer.lr=0.5": "optimizer.lr=0.01 (now 0.5)",
        "model.layer_sizes=[2,4,1]": "model.layer_sizes=[2,2,1] (now [2,4,1])",
    }
    for override, needle in cases.items():
        cfg = compose_config([f"ckpt_path={bare}", override], tmp_path / "new")
        with pytest.raises(ConfigError) as refused:
            check_config(cfg)
        assert needle in str(refused.value)
    # Without the record: the tensors alone (a foreign or edited checkpoint).
    checkpoint = torch.load(bare, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, bare)
    cfg = compose_config([f"ckpt_path={bare}", "model.layer_sizes=[2,4,1]"], tmp_path / "new")
    with pytest.raises(ConfigError, match=r"holds another network \(net.fc1.weight \[2, 2\]"):
        check_config(cfg)
    cfg = compose_config([f"ckpt_path={bare}", "optimizer=adam"], tmp_path / "new")
    with pytest.raises(ConfigError, match="holds the state of another optimizer"):
        check_config(cfg)


def test_resuming_a_completed_run_says_so_and_changes_nothing(copy_of):
    root, run_dir = copy_of
    before = snapshot(run_dir)
    code, out = run([f"ckpt_path={run_dir}"], root)
    assert code == 0, out
    assert f"The run in {run_dir} is complete at step 60" in out
    assert f"make train ckpt_path={run_dir} trainer.max_epochs=120" in out
    assert snapshot(run_dir) == before


def test_extending_a_run_continues_it_and_the_records_say_what_trained_it(copy_of, tmp_path):
    root, run_dir = copy_of
    # Only ckpt_path and the new length: the run's own overrides (its cadence) are taken.
    code, out = run([f"ckpt_path={run_dir}", "trainer.max_epochs=100"], root)
    assert code == 0, out
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 100
    # The same weights as one 100-epoch run.
    whole = tmp_path / "whole"
    train(compose_config([*RUN[1:], "trainer.max_epochs=100"], whole))
    expected = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in expected.items():
        assert torch.equal(final["state_dict"][name], value), name
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.trainer.max_epochs == 100
    assert config.callbacks.checkpoint.every_n_train_steps == 20
    overrides = list(OmegaConf.load(run_dir / "overrides.yaml"))
    assert "trainer.max_epochs=100" in overrides and "trainer.max_epochs=60" not in overrides
    assert "callbacks.checkpoint.every_n_train_steps=20" in overrides
    assert not any(o.startswith("ckpt_path=") for o in overrides)
    # One curve: the final scalars of the first part were purged, the new ones written once.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("final/grad_norm_total")] == [100]


def test_merged_overrides_keep_the_run_and_take_the_change():
    saved = ["optimizer=adam", "trainer.max_epochs=60", "+optimizer.amsgrad=true"]
    resumed = ["ckpt_path=outputs/x", "trainer.max_epochs=90", "print_every=0"]
    assert merged_overrides(saved, resumed) == [
        "optimizer=adam",
        "trainer.max_epochs=90",
        "+optimizer.amsgrad=true",
        "print_every=0",
    ]


def test_one_process_trains_a_run_at_a_time(copy_of):
    root, run_dir = copy_of
    first = subprocess.Popen(
        command([f"ckpt_path={run_dir}", "trainer.max_epochs=1000000"], root),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "Run directory" in first.stdout.readline()
        # Both ways of naming the run: its folder, and `last` (the newest run of this name).
        for target in (str(run_dir), "last"):
            code, out = run([f"ckpt_path={target}", "trainer.max_epochs=1000000"], root)
            assert code == 2, out
            assert f"Error: {run_dir} is being trained by another process" in out, out
            assert out.count("\n") == 1, out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # A killed process leaves no stale lock.
    lock = RunLock(run_dir)
    lock.acquire()
    lock.release()


def test_the_lock_is_exclusive_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = RunLock(run_dir)
    first.acquire()
    with pytest.raises(RunInUse, match="is being trained by another process"):
        RunLock(run_dir).acquire()
    assert list(run_dir.iterdir()) == []
    first.release()
    RunLock(run_dir).acquire()


# --- checkpoints that load but are wrong ---------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda c: c.update(global_step="abc"), "its global_step is 'abc', not an integer >= 0"),
        (lambda c: c.update(global_step=-5), "its global_step is -5, not an integer >= 0"),
        (lambda c: c.update(epoch=1.5), "its epoch is 1.5, not an integer >= 0"),
        (lambda c: c.pop("state_dict"), "is not a Lightning checkpoint: it lacks state_dict"),
        (lambda c: c.update(state_dict=[1, 2]), "its state_dict is not a dict of tensors"),
        (
            lambda c: c["state_dict"]["net.fc1.weight"].fill_(float("nan")),
            "holds weights that are not finite (net.fc1.weight)",
        ),
    ],
)
def test_a_checkpoint_that_loads_but_cannot_resume_is_refused(copy_of, damage, needle):
    root, run_dir = copy_of
    path = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError) as refused:
        check_checkpoint(path)
    assert needle in str(refused.value)


def test_a_nan_checkpoint_on_the_command_line_is_refused_in_a_line(copy_of):
    root, run_dir = copy_of
    path = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["net.fc2.bias"].fill_(float("inf"))
    torch.save(checkpoint, path)
    before = snapshot(run_dir)
    code, out = run([f"ckpt_path={run_dir}", "trainer.max_epochs=600"], root)
    assert code == 2, out
    assert "holds weights that are not finite (net.fc2.bias)" in out
    assert out.count("\n") == 1 and "last.ckpt that does not exist" not in out
    assert snapshot(run_dir) == before


def test_epochs_done_counts_an_epoch_whose_last_batch_ran():
    def checkpoint(started, processed, last_batch):
        progress = {"current": {"started": started, "processed": processed}}
        batches = {"is_last_batch": last_batch}
        loops = {"epoch_progress": progress, "epoch_loop.batch_progress": batches}
        return {"epoch": processed, "loops": {"fit_loop": loops}}

    assert epochs_done(checkpoint(30, 29, True)) == 30  # saved after the epoch's last batch
    assert epochs_done(checkpoint(30, 29, False)) == 29  # mid-epoch
    assert epochs_done(checkpoint(25, 25, True)) == 25  # saved at the end of training
    assert epochs_done({"epoch": 7}) == 7  # no loop state: its epoch counter


# --- bad input, before anything is written ---------------------------------------------------

BAD_INPUT = {
    "optimizer.lr=1e300": "optimizer.lr=1e+300 is not allowed",
    "+optimizer.nesterov=true": "optimizer: Nesterov momentum requires a momentum",
    "+optimizer.foo=1": "optimizer: SGD.__init__() got an unexpected keyword argument 'foo'",
    "name='${name}'": "name='${name}' cannot be resolved: Recursive interpolation detected",
    "name=../../x": "name='../../x' is not allowed: expected a folder name under paths.root",
    "name=/abs": "name='/abs' is not allowed",
    "callbacks.gradient_monitor.norm_types=[fro]": "norm_types must hold numbers > 0 or 'inf'",
    "callbacks.gradient_monitor.bins=1000000000": "bins must be an int >= 1 and <= 10000",
    "callbacks.checkpoint.every_n_train_steps=null": "every_n_train_steps must be an integer",
    "trainer.devices=abc": "trainer.devices='abc' is not allowed",
    "trainer.precision=bogus": "trainer.precision='bogus' is not allowed",
    "trainer.strategy=deepspeed": "trainer: To use the `DeepSpeedStrategy`",
    "trainer.accelerator=mps": "trainer: `MPSAccelerator` can not run on your system",
    "trainer.num_nodes=2": "trainer.num_nodes=2 needs one process per node",
    "seed=99999999999": "seed=99999999999 is not allowed",
    "seed=-1": "seed=-1 is not allowed: expected an integer in [0, 4294967295]",
    "callbacks.gradient_monitor.norm_types=[0]": "norm_types must hold numbers > 0 or 'inf'",
    "callbacks.gradient_monitor.norm_types=[-inf]": "norm_types must hold numbers > 0 or 'inf'",
    "callbacks.checkpoint.every_n_train_steps=0": "every_n_train_steps must be an integer >= 1",
    "trainer.devices=0": "trainer.devices=0 is not allowed",
    "data=moons data.n_samples=3e9": "data.n_samples must be an integer >= 1, got 3000000000.0",
    "model.layer_sizes=[2,1000000000,1]": "makes a network of 4,000,000,001 parameters too "
    "large for memory",
    "data=moons data.n_samples=3000000000": "data.n_samples=3000000000 makes a dataset too large",
}


@pytest.mark.parametrize("override", BAD_INPUT)
def test_bad_input_is_refused_in_a_line_naming_the_key(override, tmp_path):
    if "mps" in override and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    cfg = compose_config(override.split(), tmp_path / "run")
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    assert BAD_INPUT[override] in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_bad_input_on_the_command_line_leaves_nothing_behind(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    chosen = ["name='${name}'", "+optimizer.nesterov=true", "trainer.num_nodes=2"]
    chosen += ["logger=mlflow"] if not _has("mlflow") else []
    for (code, out), override in zip(run_all([[o] for o in chosen], root), chosen, strict=True):
        assert code == 2, (override, out)
        assert out.count("\n") == 1 and out.startswith("Error in config: "), (override, out)
    # No run folder, no .hydra/, no train.log.
    assert list(root.iterdir()) == []


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_paths_stay_under_the_root(tmp_path):
    for override in ("name=../../x", "name=a/../../x"):
        code, out = run([override], tmp_path / "runs")
        assert code == 2 and "is not allowed" in out, (override, out)
    # An empty root would put the run at the filesystem's root.
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.train", "paths.root="],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "paths.root='' is not allowed: expected a folder path, not empty" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()
    # A name may group runs in a subfolder, still under the root.
    cfg = compose_config(["name=study/a", f"paths.root={tmp_path}"], tmp_path / "study/a/1")
    check_config(cfg)


def test_sizes_too_large_for_memory_name_their_size(tmp_path, monkeypatch):
    import gradwatch.preflight as preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 2**30)  # 1 GiB free
    # 2*100000 + 100000 + 100000*1 + 1 = 400,001 parameters: 6 MiB with gradients and Adam.
    check_fits_in_memory(compose_config(["model.layer_sizes=[2,100000,1]"], tmp_path))
    cfg = compose_config(["model.layer_sizes=[2,30000000,1]"], tmp_path)
    with pytest.raises(ConfigError, match=r"120,000,001 parameters too large for memory: "):
        check_fits_in_memory(cfg)
    with pytest.raises(ConfigError, match=r"about 1.8 GiB, and this machine has 1.0 GiB free"):
        check_fits_in_memory(cfg)


# --- names that need quoting ----------------------------------------------------------------


@pytest.mark.slow
def test_a_run_named_with_spaces_and_accents_resumes_in_its_folder(tmp_path):
    root = tmp_path / "runs"
    name = "my run ü"
    code, out = run([f"name='{name}'", "trainer.max_epochs=20", "print_every=0"], root)
    assert code == 0, out
    (run_dir,) = (root / name).iterdir()
    code, out = run([f"name='{name}'", "ckpt_path=last", "trainer.max_epochs=40"], root)
    assert code == 0, out
    code, out = run([f"ckpt_path='{run_dir}'", "trainer.max_epochs=60"], root)
    assert code == 0, out
    assert list((root / name).iterdir()) == [run_dir]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 60


def test_a_run_resumed_twice_matches_one_run_of_that_length(tmp_path):
    # Each part ends on an epoch's last batch, where the periodic checkpoint falls: Lightning's
    # loops resumed from a checkpoint taken there, before the epoch closed, miscount the epochs
    # that follow, and the second resume trained a step too many.
    base = ["print_every=0", "callbacks.checkpoint.every_n_train_steps=10"]
    parts = tmp_path / "parts"
    train(compose_config([*base, "trainer.max_epochs=50"], parts))
    for epochs in (100, 150):
        train(compose_config([*base, f"trainer.max_epochs={epochs}", f"ckpt_path={parts}"], parts))
    whole = tmp_path / "whole"
    train(compose_config([*base, "trainer.max_epochs=150"], whole))
    resumed = torch.load(parts / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == expected["global_step"] == 150
    for name, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def test_a_run_ended_by_early_stopping_or_max_steps_is_complete(copy_of):
    root, run_dir = copy_of
    path = run_dir / "checkpoints" / "last.ckpt"
    # Quoted for Hydra, as the command line does (launch.quote_run_paths): the run's folder is
    # named by its overrides.
    longer = [f"ckpt_path='{run_dir}'", f"paths.root={root}", *RUN[1:]]
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"]["EarlyStopping{'monitor': 'train/loss', 'mode': 'min'}"] = {
        "stopped_epoch": 59,
        "wait_count": 5,
    }
    torch.save(checkpoint, path)
    cfg = compose_config([*longer, "trainer.max_epochs=100"], run_dir)
    with pytest.raises(RunComplete, match="ended by early stopping.*start a new run"):
        check_config(cfg)
    del checkpoint["callbacks"]["EarlyStopping{'monitor': 'train/loss', 'mode': 'min'}"]
    torch.save(checkpoint, path)
    cfg = compose_config([*longer, "trainer.max_epochs=100", "+trainer.max_steps=60"], run_dir)
    with pytest.raises(RunComplete, match=r"trainer.max_steps=60\): .* trainer.max_steps=120"):
        check_config(cfg)
    cfg = compose_config([*longer, "trainer.max_epochs=100", "+trainer.max_steps=80"], run_dir)
    assert check_config(cfg) == str(path)
