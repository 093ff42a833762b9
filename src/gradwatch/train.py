"""Training entry point: `train(cfg)` builds everything from a composed config and fits.

python -m gradwatch.train optimizer=adam optimizer.lr=0.05 trainer.max_epochs=1500
gradwatch-train experiment=xor_adam
"""

import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.profilers import (
    AdvancedProfiler,
    Profiler,
    PyTorchProfiler,
    SimpleProfiler,
)
from omegaconf import DictConfig, OmegaConf

from gradwatch.checkpoints import AtomicCheckpointIO
from gradwatch.command_line import quiet_this_process, short_hydra_errors
from gradwatch.data import InMemoryDataModule
from gradwatch.launch import (
    CONF_DIR,
    ddp_processes_for_this_job,
    quote_run_paths,
    resume_arguments,
)
from gradwatch.model import MLPModule
from gradwatch.monitor import GradientMonitor
from gradwatch.overhead import NoProfiler, apply_speedups
from gradwatch.preflight import check_config
from gradwatch.report import save_grad_flow
from gradwatch.resume import RunComplete, merged_overrides
from gradwatch.summary import RunSummary
from gradwatch.sweep import FAILED_FILE
from gradwatch.validate import ConfigError
from gradwatch.write_errors import describe_write_error

log = logging.getLogger("gradwatch")


def build_trainer(
    cfg: DictConfig, run_dir: Path, resume_step: int = 0, extra_callbacks: tuple = ()
) -> pl.Trainer:
    """The Trainer with the configured callbacks and loggers, writing into `run_dir`.

    When resuming from `resume_step`, TensorBoard is told to purge what the interrupted run wrote
    from that step on, so the resumed run continues one curve with no step written twice.
    """
    # Extra callbacks first: their on_train_end (the run summary's fit time) runs before others'.
    callbacks = list(extra_callbacks)
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    profiler = make_profiler(cfg.trainer.get("profiler"), run_dir)
    if cfg.get("speedups", True):  # every process-wide speed-up (gradwatch.overhead), or none
        callbacks = apply_speedups(callbacks)
        profiler = profiler or NoProfiler()
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node:
            purge = resume_step and node._target_.endswith("TensorBoardLogger")
            loggers.append(instantiate(node, **({"purge_step": resume_step} if purge else {})))
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        profiler=profiler,
    )


def make_profiler(name: str | None, run_dir: Path) -> Profiler | None:
    """None: Lightning's default (no profiler). simple, advanced or pytorch:
    Lightning's profiler of that name, its report written to `fit-profiler.txt` in the run
    directory (Lightning would print it at INFO level, which gradwatch's console leaves out)."""
    if name is None:
        return None
    kinds = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}
    return kinds[name](dirpath=run_dir, filename="profiler")


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config and the command-line overrides, at the top of the run directory.
    A run resumed in its own directory keeps the overrides that made it, with those the resume
    changed (trainer.max_epochs=...) put in."""
    run_dir.mkdir(parents=True, exist_ok=True)
    job_keys = [key for key in cfg if key != "hydra"]
    OmegaConf.save(OmegaConf.masked_copy(cfg, job_keys), run_dir / "config.yaml", resolve=True)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    saved = run_dir / "overrides.yaml"
    if cfg.get("ckpt_path") is not None and saved.is_file():
        overrides = merged_overrides(list(OmegaConf.load(saved)), overrides)
    OmegaConf.save(OmegaConf.create(overrides), saved)


def flat_hparams(cfg: DictConfig) -> dict[str, str | int | float | bool]:
    """The run's choices as one flat dict of plain values, for TensorBoard's HParams table."""
    flat = {"seed": cfg.seed, "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1]}
    for group in ("data", "model", "optimizer", "trainer"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if key.startswith("_") or isinstance(value, dict):
                continue
            # HParams takes str, int, float and bool: lists become text, None "null".
            plain = value if isinstance(value, str | int | float | bool) else json.dumps(value)
            flat[f"{group}.{key}"] = plain
    return flat


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; return its final metrics (also written to metrics.json)."""
    ckpt_path = check_config(cfg)
    resume_step = torch.load(ckpt_path, weights_only=True)["global_step"] if ckpt_path else 0
    run_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: InMemoryDataModule = instantiate(cfg.data)
    model: MLPModule = instantiate(
        cfg.model, optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True), _recursive_=False
    )
    summary = RunSummary(run_dir, flat_hparams(cfg))
    trainer = build_trainer(cfg, run_dir, resume_step, extra_callbacks=(summary,))
    if trainer.is_global_zero:
        save_run_config(cfg, run_dir)
        log.info(f"Run directory: {run_dir}")

    with ddp_processes_for_this_job():
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    # grad_flow.png is drawn after fit: reporting is not training, and matplotlib costs tenths
    # of a second that the fit time of a 5000-epoch run should not carry.
    monitor = next((c for c in trainer.callbacks if isinstance(c, GradientMonitor)), None)
    if monitor is not None and trainer.is_global_zero:
        save_grad_flow(monitor.history, run_dir / "grad_flow.png", monitor.summary()["alerts"])
    return summary.metrics


def objective(metrics: dict[str, float]) -> float | None:
    """What a sweeper minimizes (hydra-optuna-sweeper): the final training loss, the value the
    sweep's table ranks by. None where there is no number to compare (a loss that went NaN):
    the sweeper records a failed trial and goes on."""
    loss = metrics.get("train/loss")
    return None if loss is None or math.isnan(loss) else loss


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun: returns the run's objective for sweepers; a job that
    fails returns None (a failed trial) after recording why for the sweep's table. Hydra
    ignores what a single run returns."""
    quiet_this_process()  # a no-op under `main`; a launcher plugin's job process needs it
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return objective(train(cfg))
    except RunComplete as complete:  # a sweep's job resumed past its end: nothing to do
        log.info(str(complete))
    except (ConfigError, OSError) as error:
        # A bad value, a full or read-only disk: the user's to fix. Say which, in a line.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(error, ConfigError):
            message = f"Error in config: {error}"
        else:
            message = f"Error writing the run: {describe_write_error(error, cfg.paths.output_dir)}"
        log.error(message)
        if multirun:
            # Record it for the sweep's table and let the other jobs run.
            Path(cfg.paths.output_dir, FAILED_FILE).write_text(message + "\n")
            return None
        sys.exit(2 if isinstance(error, ConfigError) else 3)
    except Exception as error:
        if not multirun:
            raise
        # One failing job must not stop or corrupt the others: report it now, rank it at the end.
        log.exception(f"Job {HydraConfig.get().job.override_dirname} failed: {error}")
        Path(cfg.paths.output_dir, FAILED_FILE).write_text(traceback.format_exc())
    return None


def main() -> None:
    """`gradwatch-train` and `python -m gradwatch.train`: Hydra's command line."""
    quiet_this_process()
    short_hydra_errors()
    sys.argv[1:] = quote_run_paths(sys.argv[1:])
    sys.argv.extend(resume_arguments(sys.argv[1:]))
    hydra_main()


if __name__ == "__main__":
    main()
