"""Sweeps beyond one process, with Hydra's plugins (optional extras, pyproject.toml):
`hydra/launcher=submitit_local` runs each job in a process of its own and gives the basic
launcher's folders and table; `hydra/launcher=slurm` asks SLURM for what the trainer runs (its
sbatch script is written here, never submitted: there is no SLURM here); `experiment=xor_optuna`
searches with Optuna, each trial's objective its final loss, ranked the same way.

CI's `make test` installs `.[dev]` only: the tests that need a plugin skip without it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradwatch.command_line import plugin_hint
from gradwatch.train import objective

SUBMITIT = "needs the submitit extra: .venv/bin/pip install -e '.[submitit]'"
OPTUNA = "needs the optuna extra: .venv/bin/pip install -e '.[optuna]'"


@pytest.fixture
def submitit_extra():
    return pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=SUBMITIT)


@pytest.fixture
def optuna_extra():
    return pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=OPTUNA)


def gradwatch_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gradwatch.train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def the_sweep(root: Path) -> Path:
    (sweep,) = (root / "sweeps").glob("*/*")
    return sweep


def table_rows(sweep: Path) -> list[str]:
    """sweep_results.md less its two header lines."""
    return (sweep / "sweep_results.md").read_text().splitlines()[2:]


def job_of(row: str) -> str:
    return row.split(" | ")[1]


# --- the objective sweepers minimize -------------------------------------------------------


def test_the_objective_is_the_final_loss_and_none_without_a_number():
    assert objective({"train/loss": 0.25, "train/acc": 0.5}) == 0.25
    # None: hydra-optuna-sweeper records a failed trial and goes on (a NaN would stop it).
    assert objective({"train/loss": float("nan")}) is None
    assert objective({}) is None


def test_a_plugins_option_without_its_extra_says_how_to_install_it():
    """Appended to Hydra's 'Unknown option hydra/launcher=submitit_local' (or, for
    hydra/launcher=slurm, 'Could not load hydra/launcher/submitit_slurm') where the extra is
    not installed."""
    assert plugin_hint("hydra/launcher/submitit_local").endswith("pip install -e '.[submitit]'")
    assert "hydra/launcher=submitit_slurm comes with the submitit extra" in plugin_hint(
        "hydra/launcher/submitit_slurm"
    )
    assert plugin_hint("hydra/sweeper/optuna").endswith("pip install -e '.[optuna]'")
    assert plugin_hint("optimizer/adamm") == ""


# --- SLURM: composed and written here, never submitted ----------------------------------------

GPU_DDP = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2"]


def slurm_config(tmp_path: Path, *overrides: str) -> DictConfig:
    """The config of `python -m gradwatch.train -m hydra/launcher=slurm <overrides>`."""
    cfg = compose_config(
        ["hydra/launcher=slurm", f"paths.root={tmp_path}", *overrides], tmp_path / "run"
    )
    GlobalHydra.instance().clear()
    return cfg


def slurm_launcher_params(tmp_path: Path, *overrides: str) -> dict:
    return OmegaConf.to_container(slurm_config(tmp_path, *overrides).hydra.launcher, resolve=True)


def test_slurm_launcher_asks_for_one_task_per_trainer_device(tmp_path, submitit_extra):
    params = slurm_launcher_params(tmp_path, *GPU_DDP)
    assert params["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert params["timeout_min"] == 60
    # A CPU trainer asks for no GPU.
    cpu = slurm_launcher_params(tmp_path, "trainer=ddp", "trainer.devices=2")
    assert (cpu["nodes"], cpu["tasks_per_node"], cpu["gpus_per_node"]) == (1, 2, None)


def test_slurm_sbatch_script_is_what_the_trainer_runs(tmp_path, monkeypatch, submitit_extra):
    """The launcher itself writes the sbatch script; the submission (sbatch) is where it stops.
    submitit looks for `srun` on PATH before anything: a stand-in that is never run."""
    import submitit

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin")

    class Submitted(Exception):
        pass

    def write_instead_of_submitting(executor, function, *arguments):
        raise Submitted(executor._executor._make_submission_file_text("<command>", "<uid>"))

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", write_instead_of_submitting)

    def sbatch_script(*overrides: str) -> str:
        cfg = slurm_config(tmp_path, *overrides)
        launcher = instantiate(cfg.hydra.launcher)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        with pytest.raises(Submitted) as submitted:
            launcher.launch([["optimizer=sgd"], ["optimizer=adam"]], initial_job_idx=0)
        return str(submitted.value)

    script = sbatch_script(*GPU_DDP, "hydra.launcher.partition=gpu")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=60"):
        assert f"#SBATCH {line}\n" in script, script
    assert "#SBATCH --partition=gpu\n" in script
    assert "--gpus-per-node" not in sbatch_script("trainer=ddp", "trainer.devices=2")


def test_cfg_hydra_shows_the_slurm_launcher(submitit_extra):
    done = gradwatch_train("hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher")
    assert done.returncode == 0, done.stderr
    shown = OmegaConf.create(done.stdout)
    assert shown._target_.endswith("submitit_launcher.SlurmLauncher")
    assert OmegaConf.to_container(shown)["tasks_per_node"] == "${trainer.devices}"


# --- submitit_local: each job its own process, the basic launcher's folders and table ----------


@pytest.mark.slow  # two start-ups of Python, torch and Lightning: about 20 s here
def test_bad_config_is_refused_before_any_job_is_submitted(tmp_path, submitit_extra):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # gradwatch's check before the sweep (CheckBeforeRun.on_multirun_start): exit 2, nothing made.
    unwritable = f"paths.root={a_file}/runs"
    done = gradwatch_train("-m", "hydra/launcher=submitit_local", "optimizer=sgd,adam", unwritable)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"paths.root={a_file}/runs cannot be written" in done.stderr
    # Hydra's check of every job's overrides (its basic sweeper): nothing submitted.
    root = tmp_path / "outputs"
    done = gradwatch_train(
        "-m", "hydra/launcher=submitit_local", "optimizer=sgd,adamm", f"paths.root={root}"
    )
    assert done.returncode == 1
    assert "Unknown option optimizer=adamm" in done.stderr
    assert not list(root.rglob(".submitit")) and not list(root.rglob("*.log"))


SWEEP = ["optimizer=adam", "optimizer.lr=0.1,0.001,-1", "trainer.max_epochs=200", "name=t"]
JOBS = [f"optimizer.lr={lr},optimizer=adam,trainer.max_epochs=200" for lr in (0.1, 0.001, -1)]


@pytest.mark.slow
def test_submitit_local_sweep_gives_the_basic_launchers_folders_and_table(tmp_path, submitit_extra):
    basic = gradwatch_train("-m", *SWEEP, f"paths.root={tmp_path / 'basic'}")
    done = gradwatch_train(
        "-m", "hydra/launcher=submitit_local", *SWEEP, f"paths.root={tmp_path / 'submitit'}"
    )
    out = done.stdout + done.stderr
    # One job failed: the others ran, and the sweep as a whole says so.
    assert done.returncode == 1 == basic.returncode, out
    assert "1 of 3 jobs failed" in out
    sweep = the_sweep(tmp_path / "submitit")
    # Job folders named by their overrides, as with the basic launcher; submitit's own files
    # (pickles, each job's stdout and stderr) in .submitit/, which the table leaves out.
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted([*JOBS, ".submitit"])
    rows = table_rows(sweep)
    assert [job_of(row) for row in rows] == JOBS
    assert "FAILED: Error in config: optimizer.lr=-1 is not allowed" in rows[2]
    # The same seeds, the same numbers: row for row the basic launcher's table.
    assert rows == table_rows(the_sweep(tmp_path / "basic"))

    # Each job ran in a process of its own, with Hydra's job folder, log and event file.
    event_files = [next((sweep / job).glob("events.out.tfevents.*")) for job in JOBS[:2]]
    # events.out.tfevents.<time>.<host>.<pid>.<n>: two jobs, two process ids.
    assert len({path.name.rsplit(".", 2)[1] for path in event_files}) == 2
    for job in JOBS:
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
    assert "Error in config: optimizer.lr=-1" in (sweep / JOBS[2] / "train.log").read_text()
    # The job processes quiet Lightning's known warnings as `main` does for its own.
    job_stderr = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    assert "smaller than the logging interval" not in job_stderr


# --- Optuna: a search whose objective is the final loss -------------------------------------


@pytest.mark.slow
def test_optuna_search_minimizes_the_final_loss_and_ranks_trials_the_same_way(
    tmp_path, optuna_extra
):
    # Six trials of 100 epochs; a hidden size of -1 makes some of them fail (seed 0 of the
    # shipped sampler: two trials run, four fail).
    done = gradwatch_train(
        "-m",
        "experiment=xor_optuna",
        "hydra.sweeper.n_trials=6",
        "trainer.max_epochs=100",
        "hidden_size=4,-1",
        f"paths.root={tmp_path}",
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # failed trials: reported, the search went on
    sweep = the_sweep(tmp_path)
    rows = table_rows(sweep)
    assert len(rows) == 6
    finished = [row for row in rows if "FAILED" not in row]
    failed = [row for row in rows if "FAILED" in row]
    assert len(finished) >= 2 and failed
    assert rows == finished + failed
    assert all(job_of(row).startswith("hidden_size=-1,") for row in failed)
    assert all("FAILED: Error in config: model.layer_sizes" in row for row in failed)

    # Each finished trial's objective is its final loss; the table ranks by it, best first.
    losses = [
        json.loads((sweep / job_of(row) / "metrics.json").read_text())["train/loss"]
        for row in finished
    ]
    assert losses == sorted(losses)
    # Optuna's best trial is the table's first row, with the same value.
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    params = best.best_params
    first = f"hidden_size={params.hidden_size},optimizer.lr={params['optimizer.lr']}"
    assert job_of(rows[0]) == f"{first},optimizer={params.optimizer},trainer.max_epochs=100"
    assert best.best_value == losses[0]


@pytest.mark.slow
def test_submitit_local_job_starts_its_own_ddp_processes(tmp_path, submitit_extra):
    """Lightning starts a DDP job's other process with this process's `python -m <module>`:
    under submitit that is submitit's job runner, so gradwatch has it start gradwatch.train."""
    done = gradwatch_train(
        "-m",
        "hydra/launcher=submitit_local",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=20",
        f"paths.root={tmp_path}",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sweep = the_sweep(tmp_path)
    job = sweep / "trainer.devices=2,trainer.max_epochs=20,trainer=ddp"
    assert [job_of(row) for row in table_rows(sweep)] == [job.name]
    # Both processes trained the one job: rank 1's log beside rank 0's, one event file.
    assert (job / "train_ddp_process_1.log").is_file()
    assert len(list(job.glob("events.out.tfevents.*"))) == 1
