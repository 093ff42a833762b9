"""`trainer=ddp trainer.devices=2` from the command line: two CPU processes (gloo) started by
Lightning's subprocess launcher under Hydra. One run directory, one event file written by rank
zero, the single-process run's gradient norms; and the same inside a Hydra multirun."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.train import train

# Several batches per epoch, shuffled each epoch, a val split: more than XOR's one full batch.
# Batches of 40 split evenly (20 rows per process), so the DDP average is the full-batch mean.
RUN = ["data=moons", "data.n_samples=200", "data.batch_size=40", "model.loss=cross_entropy"]
RUN += ["model.layer_sizes=[2,8,2]", "trainer.max_epochs=3", "trainer.log_every_n_steps=1"]
RUN += ["trainer.check_val_every_n_epoch=1", "print_every=0"]
DDP = ["trainer=ddp", "trainer.devices=2"]


def run_cli(args: list[str], tmp_path: Path) -> tuple[Path, str]:
    """`python -m gradwatch.train <args>` from an empty working directory; returns paths.root."""
    root, cwd = tmp_path / "outputs", tmp_path / "cwd"
    cwd.mkdir()
    command = [sys.executable, "-m", "gradwatch.train", *args, f"paths.root={root}"]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Nothing lands in the working directory (no outputs/, lightning_logs/, .pl_hydra_rank_*).
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())
    return root, output


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def assert_one_run(run_dir: Path) -> None:
    """What one DDP run leaves: rank zero's files, and the second process's log beside them."""
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    # The second process was started in this directory (hydra.run.dir=<this run>) and logged
    # here; it made no directory of its own and wrote no .hydra/ (hydra.output_subdir=null).
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [".hydra", "checkpoints"]
    for name in ("config.yaml", "metrics.json", "gradients.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name


def test_ddp_run_writes_one_directory_with_the_single_process_norms(tmp_path, make_cfg):
    root, output = run_cli([*RUN, *DDP], tmp_path)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    # One run directory for both processes, nothing else under paths.root.
    assert [p.name for p in root.iterdir()] == ["moons"]
    (run_dir,) = (root / "moons").iterdir()
    assert_one_run(run_dir)

    cfg = make_cfg(*RUN)
    single_metrics = train(cfg)
    single = read_scalars(Path(cfg.paths.output_dir))
    ddp = read_scalars(run_dir)

    tags = [t for t in single if t.startswith(("grad_norm/", "update_ratio/"))]
    assert {"grad_norm/total", "grad_norm/fc1.weight", "update_ratio/fc2"} <= set(tags)
    assert sorted(t for t in ddp if t.startswith(("grad_norm/", "update_ratio/"))) == sorted(tags)
    steps = list(range(12))  # 160 training rows / 40 = 4 steps an epoch, 3 epochs
    for tag in tags:
        # Rank zero alone writes: each step exactly once.
        assert [s for s, _ in ddp[tag]] == [s for s, _ in single[tag]] == steps, tag
        for (step, a), (_, b) in zip(single[tag], ddp[tag], strict=True):
            assert math.isclose(a, b, rel_tol=1e-6), (tag, step, a, b)
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert ddp_metrics["steps"] == single_metrics["steps"] == 12
    # The loss is averaged over the processes (sync_dist): the full batch's loss.
    assert math.isclose(ddp_metrics["train/loss"], single_metrics["train/loss"], rel_tol=1e-5)


@pytest.mark.slow
def test_ddp_inside_a_multirun_gives_each_job_its_own_directory(tmp_path):
    args = ["-m", *DDP, "trainer.max_epochs=5", "trainer.log_every_n_steps=1", "print_every=0"]
    root, output = run_cli([*args, "optimizer.lr=0.01,0.05"], tmp_path)
    # One sweep: the second process of each job runs that job, not a sweep of its own.
    (sweep_dir,) = (root / "sweeps" / "xor").iterdir()
    assert list(root.iterdir()) == [root / "sweeps"]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [job.name.split(",")[0] for job in jobs] == ["optimizer.lr=0.01", "optimizer.lr=0.05"]
    for job in jobs:
        assert_one_run(job)
        scalars = read_scalars(job)
        assert [s for s, _ in scalars["grad_norm/total"]] == [0, 1, 2, 3, 4], job.name
        assert json.loads((job / "metrics.json").read_text())["steps"] == 5
    table = (sweep_dir / "sweep_results.md").read_text()
    assert table.count("| optimizer.lr=") == 2 and "FAILED" not in table
    # Each job started its own second process: two jobs, two process groups.
    assert output.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2


@pytest.mark.slow
def test_ddp_stops_on_nonfinite_gradients_without_hanging(tmp_path):
    """experiment=exploding under DDP: every process stops at the same step (no collective left
    waiting), rank zero writes the alerts, and the last good checkpoint is kept."""
    root, output = run_cli(["experiment=exploding", *DDP], tmp_path)
    assert output.count("ALERT GradientMonitor: non-finite gradients") == 1
    (run_dir,) = (root / "exploding").iterdir()
    assert_one_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["alerts/exploding"] == 1 and metrics["alerts/nonfinite"] == 1
    assert metrics["steps"] < 100


@pytest.mark.slow
def test_ddp_raises_the_single_process_alerts_quoting_the_logged_loss(tmp_path, make_cfg):
    """The tutorial's run stalls at step 599. Under DDP each process's loss is its half-batch's;
    the alerts use the processes' mean, the `train/loss` that is logged, so they fire at the same
    steps as in one process and quote the same loss."""
    args = ["trainer.max_epochs=1000", "print_every=0"]
    root, output = run_cli([*args, *DDP], tmp_path)
    (run_dir,) = (root / "xor").iterdir()
    ddp_alerts = json.loads((run_dir / "gradients.json").read_text())["alerts"]
    cfg = make_cfg(*args)
    train(cfg)
    single_alerts = json.loads(Path(cfg.paths.output_dir, "gradients.json").read_text())["alerts"]
    assert [(alert["step"], alert["kind"]) for alert in ddp_alerts] == [(599, "stall")]
    assert ddp_alerts == single_alerts
    # Rank zero alone prints it.
    assert output.count("ALERT GradientMonitor:") == 1
    assert f"ALERT GradientMonitor: {ddp_alerts[0]['message']}" in output
    # The quoted loss is the logged one: its mean over the 10 logged steps of the stall.
    logged = dict(read_scalars(run_dir)["train/loss"])
    window = [logged[step] for step in range(149, 600, 50)]
    quoted = f"the loss has stayed at {sum(window) / len(window):.4g} for 10 logged steps"
    assert quoted in ddp_alerts[0]["message"]
