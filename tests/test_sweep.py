"""A multirun: every job its own TensorBoard run, failures reported at once, a ranked table."""

import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_sweep_ranks_jobs_and_survives_a_failing_one(tmp_path):
    command = [sys.executable, "-m", "gradwatch.train", "-m", "optimizer=sgd,adam"]
    command += ["optimizer.lr=0.01,-1", "trainer.max_epochs=800", "print_every=0"]
    command += ["name=t", f"paths.root={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    # Failed jobs do not stop the others, but the sweep as a whole reports failure.
    assert done.returncode == 1, out
    (sweep,) = (tmp_path / "sweeps/t").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    # Named by their overrides (but name, paths and print_every, which change nothing trained),
    # so TensorBoard tells them apart.
    rest = ",trainer.max_epochs=800"
    adam, sgd = f"optimizer.lr=0.01,optimizer=adam{rest}", f"optimizer.lr=0.01,optimizer=sgd{rest}"
    assert jobs == [
        f"optimizer.lr=-1,optimizer=adam{rest}",
        f"optimizer.lr=-1,optimizer=sgd{rest}",
        adam,
        sgd,
    ]
    # A failing job is reported when it fails, before the next job starts.
    first_error = out.index("Error in config: ")
    assert first_error < out.index("#1 : ") or first_error < out.index("#2 : ")
    assert "optimizer.lr=-1 is not allowed" in out

    table = (sweep / "sweep_results.md").read_text().splitlines()
    assert table[2].startswith(f"| 1 | {adam} |")
    assert table[3].startswith(f"| 2 | {sgd} |")
    assert "stall x1" in table[3]  # SGD is stuck, and the monitor says so
    assert all("FAILED" in row for row in table[4:6])
    assert "2 of 4 jobs failed" in out

    # Each finished job is its own TensorBoard run with its own loss curve.
    for job in (adam, sgd):
        events = EventAccumulator(str(sweep / job))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"]
        assert len(list((sweep / job).glob("events.out.tfevents.*"))) == 1
