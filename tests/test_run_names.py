"""Single runs are named by what their command line changed, and stay easy to find and resume."""

import subprocess
import sys
from pathlib import Path

from conftest import compose_config
from omegaconf import OmegaConf

from gradwatch.launch import RUN_LABEL_BYTES, quote_run_paths, run_folder


def run_dir_of(*overrides: str) -> str:
    """The run folder name `python -m gradwatch.train <overrides>` would get."""
    cfg = compose_config(list(overrides), Path("unused"))
    return Path(OmegaConf.select(cfg, "hydra.run.dir")).name


def test_a_plain_run_is_its_time_and_overrides_come_first():
    plain = run_dir_of()
    assert "@" not in plain and "=" not in plain  # outputs/xor/<time>: no empty segment
    adam = run_dir_of("optimizer=adam", "optimizer.lr=0.05", "paths.root=/elsewhere")
    assert adam.startswith("optimizer.lr=0.05,optimizer=adam@")  # paths.root does not name it
    # Keys that do not change what trains stay out of the name.
    assert "@" not in run_dir_of("print_every=7", "ckpt_path=null", "name=xor")


def test_long_or_slashed_overrides_make_one_readable_folder():
    assert run_folder("", "T") == "T"
    assert run_folder("data.path=a/b", "T") == "data.path=a_b@T"
    long_a = ",".join(f"model.k{i}={i}" for i in range(40))
    long_b = long_a + ",seed=1"
    a, b = run_folder(long_a, "T"), run_folder(long_b, "T")
    assert len(a.encode()) <= RUN_LABEL_BYTES + len("@T") and a != b  # cut, but still apart


def test_a_pasted_run_folder_is_quoted_for_hydra():
    args = ["ckpt_path=outputs/xor/optimizer=adam,seed=[1]@T", "ckpt_path=last", "seed=1"]
    assert quote_run_paths(args) == ["ckpt_path='outputs/xor/optimizer=adam,seed=[1]@T'", *args[1:]]


def train(root: Path, *args: str) -> str:
    command = [
        sys.executable,
        "-m",
        "gradwatch.train",
        *args,
        f"paths.root={root}",
        "print_every=0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_runs_land_in_override_folders_and_last_finds_the_newest(tmp_path):
    train(tmp_path, "optimizer=adam", "optimizer.lr=0.05", "trainer.max_epochs=3")
    train(tmp_path, "seed=3", "trainer.max_epochs=3")
    names = sorted(p.name.split("@")[0] for p in (tmp_path / "xor").iterdir())
    assert names == [
        "optimizer.lr=0.05,optimizer=adam,trainer.max_epochs=3",
        "seed=3,trainer.max_epochs=3",
    ]
    # `last` is the newest run whatever it is named; it continues in its own folder, and its
    # folder, pasted as printed, resumes it too.
    train(tmp_path, "ckpt_path=last", "trainer.max_epochs=4")
    (seed_run,) = (tmp_path / "xor").glob("seed=3*")
    out = train(tmp_path, f"ckpt_path={seed_run}", "trainer.max_epochs=5")
    assert f"Run directory: {seed_run}" in out
    assert len(list((tmp_path / "xor").iterdir())) == 2
    metrics = OmegaConf.load(seed_run / "metrics.json")
    assert metrics.epochs == 5
