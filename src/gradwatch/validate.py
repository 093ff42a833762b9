"""Checks a composed config before anything trains, so a typo costs seconds, not a run.

Hydra itself rejects unknown group options and unknown keys (struct mode); what it cannot know
(types of plain YAML values, ranges, whether the network fits the dataset, whether a GPU is there,
whether the output folder can be written, whether `ckpt_path` is a checkpoint) is checked here.
Every message names the key, the value given and what is allowed.
"""

import errno
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradwatch.data import DATASET_INFO, DATASETS
from gradwatch.model import ACTIVATIONS, LOSSES

log = logging.getLogger("gradwatch")

CHECKPOINT_KEYS = ("state_dict", "global_step", "epoch")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key, the value and what is allowed."""


def _is_int(value: Any) -> bool:
    # YAML `true` is a bool, and bool is an int subclass: not an epoch count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_at_least(low: int, nullable: bool = False) -> tuple[Callable[[Any], bool], str]:
    text = f"an integer >= {low}" + (" or null" if nullable else "")
    return (lambda v: (nullable and v is None) or (_is_int(v) and v >= low)), text


def _number(
    low: float, high: float | None = None, low_open: bool = False, high_open: bool = True
) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if not _is_number(v) or (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)

    text = f"a number {'>' if low_open else '>='} {low}"
    if high is not None:
        text = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return ok, text


def _one_of(allowed: tuple[str, ...] | list[str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), f"one of {list(allowed)}"


def _layer_sizes(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) >= 2
        and all(_is_int(n) and n >= 1 for n in value)
    )


def _betas(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(_number(0, 1)[0](b) for b in value)
    )


# Key -> (check, what is allowed). A key absent from the config is not checked: groups differ
# (adam has betas, sgd has momentum) and callbacks can be dropped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "an integer"),
    "print_every": (_int_at_least(0)[0], "an integer >= 0 (0: never)"),
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "trainer.max_epochs": _int_at_least(1),
    "trainer.num_nodes": _int_at_least(1),
    "trainer.log_every_n_steps": _int_at_least(1),
    "trainer.check_val_every_n_epoch": _int_at_least(1, nullable=True),
    "trainer.accumulate_grad_batches": _int_at_least(1),
    "trainer.accelerator": _one_of(ACCELERATORS),
    "trainer.gradient_clip_val": (
        lambda v: v is None or _number(0)[0](v),
        "a number >= 0 or null",
    ),
    "trainer.gradient_clip_algorithm": _one_of(("norm", "value")),
    "trainer.profiler": _one_of((None, "simple", "advanced", "pytorch")),
    "optimizer.lr": _number(0, low_open=True),
    "optimizer.momentum": _number(0, 1),
    "optimizer.weight_decay": _number(0),
    "optimizer.alpha": _number(0, 1, high_open=False),
    "optimizer.betas": (_betas, "two numbers in [0, 1), e.g. [0.9,0.999]"),
    "model.layer_sizes": (_layer_sizes, "a list of at least two integers >= 1, e.g. [2,2,1]"),
    "model.activation": _one_of(list(ACTIVATIONS)),
    "model.loss": _one_of(LOSSES),
    "data.name": _one_of(DATASETS),
    "data.batch_size": _int_at_least(1, nullable=True),
    "data.n_samples": _int_at_least(1),
    "data.noise": _number(0),
    "data.val_fraction": _number(0, 1),
    "data.seed": (_is_int, "an integer"),
    "callbacks.checkpoint.every_n_train_steps": _int_at_least(0, nullable=True),
    # The gradient monitor's own arguments (GradientMonitor.__init__ checks the same, later).
    "callbacks.gradient_monitor.bins": _int_at_least(1),
    "callbacks.gradient_monitor.log_every_n_steps": (
        _int_at_least(0, nullable=True)[0],
        "an integer >= 1, 0 (never) or null (the trainer's)",
    ),
    "callbacks.gradient_monitor.histogram_every_n_steps": (
        _int_at_least(0, nullable=True)[0],
        "an integer >= 1, 0 (never) or null (ten times the scalar cadence)",
    ),
    "callbacks.gradient_monitor.vanishing_patience": _int_at_least(1),
    "callbacks.gradient_monitor.exploding_window": _int_at_least(1),
    "callbacks.gradient_monitor.stall_patience": _int_at_least(2),
    "callbacks.gradient_monitor.vanishing_threshold": _number(0),
    "callbacks.gradient_monitor.vanishing_fraction": _number(0),
    "callbacks.gradient_monitor.stall_update_ratio": _number(0),
    "callbacks.gradient_monitor.stall_loss_tol": _number(0),
    "callbacks.gradient_monitor.exploding_factor": _number(1, low_open=True),
    "callbacks.gradient_monitor.on_nonfinite": _one_of(("warn", "stop")),
}


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(key: str, value: Any) -> str:
    # As it would be typed on the command line: trainer.max_epochs='ten', model.layer_sizes=[2,0].
    if isinstance(value, list):
        return f"{key}=[{','.join(map(str, value))}]"
    return f"{key}={value!r}"


def check_values(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every known key whose value has the wrong type or range."""
    problems = []
    for key, (ok, allowed) in RULES.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        # A value copied from another key (data.seed: ${seed}) is reported there, once.
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        if OmegaConf.is_interpolation(parent, leaf):
            continue
        try:
            value = _plain(OmegaConf.select(cfg, key, throw_on_missing=True))
        except OmegaConfBaseException as error:
            problems.append(f"{key}: {str(error).splitlines()[0]}")
            continue
        if not ok(value):
            problems.append(f"{_show(key, value)} is not allowed: expected {allowed}")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} values cannot run:\n  " + "\n  ".join(problems))


def check_config(cfg: DictConfig) -> str | None:
    """Raise ConfigError for values in `cfg` that cannot run; return the checkpoint to resume
    from (`ckpt_path` resolved by :func:`resolve_checkpoint`), or None to start fresh.

    Order: types and ranges of every known key (all problems at once), then the network against
    the dataset, then the machine (GPU, writable folders), then the checkpoint.
    """
    check_values(cfg)
    check_model_fits_data(cfg)
    check_accelerator(cfg)
    check_writable_outputs(cfg)
    return resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.root, cfg.name)


def check_model_fits_data(cfg: DictConfig) -> None:
    """The network's first and last sizes and the loss must suit the dataset."""
    info = DATASET_INFO[cfg.data.name]
    sizes, loss = list(cfg.model.layer_sizes), cfg.model.loss
    if loss not in LOSSES:
        raise ConfigError(f"model.loss={loss!r} is not one of {list(LOSSES)}")
    if sizes[0] != info.num_inputs:
        raise ConfigError(
            f"model.layer_sizes={sizes} starts with {sizes[0]} inputs, but data={cfg.data.name} "
            f"has {info.num_inputs}: use model.layer_sizes=[{info.num_inputs},...]"
        )
    if info.is_regression and loss != "mse":
        raise ConfigError(
            f"model.loss={loss} needs class targets, but data={cfg.data.name} is regression: "
            "use model.loss=mse"
        )
    outputs = info.num_classes if loss == "cross_entropy" else 1
    if sizes[-1] != outputs:
        raise ConfigError(
            f"model.layer_sizes={sizes} ends with {sizes[-1]} outputs, but model.loss={loss} on "
            f"data={cfg.data.name} needs {outputs}"
        )
    if not info.is_regression and info.num_classes > 2 and loss != "cross_entropy":
        raise ConfigError(
            f"model.loss={loss} fits two classes, but data={cfg.data.name} has "
            f"{info.num_classes}: use model.loss=cross_entropy"
        )


def check_accelerator(cfg: DictConfig) -> None:
    """`trainer=gpu` needs CUDA, and as many GPUs as `trainer.devices` asks for."""
    accelerator = cfg.trainer.get("accelerator", "cpu")
    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not available:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
            f"(torch {torch.__version__}): use trainer=cpu"
        )
    devices = cfg.trainer.get("devices", 1)
    if _is_int(devices) and devices > available:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {available} CUDA GPU(s): "
            f"use trainer.devices=1..{available} or trainer.devices=-1 (all)"
        )


def writable_problem(path: str | Path) -> str | None:
    """Why files cannot be written under `path` (which need not exist yet), or None if they can.

    Probes the nearest existing folder with a temporary file, so the answer is the operating
    system's (root may write to a chmod 555 folder; nobody can create a folder under a file).
    Nothing is left behind.
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"cannot write in {existing}: {error.strerror or error}"
    return None


def _output_paths(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(key, path) of every folder the run writes into: the run directory, the checkpoint
    folders of callbacks, the save_dir of loggers."""
    keys = ["paths.output_dir"]
    for group, field in (("callbacks", "dirpath"), ("logger", "save_dir")):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and node.get(field) is not None:
                keys.append(f"{group}.{name}.{field}")
    return [(key, OmegaConf.select(cfg, key)) for key in keys]


def check_writable_outputs(cfg: DictConfig) -> None:
    """Every folder the run writes into must be writable now, not at the first checkpoint."""
    for key, path in _output_paths(cfg):
        problem = writable_problem(path)
        if problem:
            raise ConfigError(f"{key}={path} cannot be written: {problem}")


def resolve_checkpoint(ckpt_path: str | None, runs_root: str | Path, name: str) -> str | None:
    """The checkpoint file that `ckpt_path` names, checked to be a loadable Lightning checkpoint.

    Args:
        ckpt_path: None (start fresh), `last` (the run under `<runs_root>/<name>/` whose
            `checkpoints/last.ckpt` was written most recently), a run directory (its
            `checkpoints/last.ckpt`) or a checkpoint file.
        runs_root: where run directories live (`paths.root`).
        name: the run name (`name`), the folder under `runs_root` that `last` searches.

    Raises:
        ConfigError: if there is no such file, or it is corrupted, truncated, not a Lightning
            checkpoint, or needs unsafe (pickle) loading.
    """
    if ckpt_path is None:
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        runs = Path(runs_root) / name
        candidates = list(runs.glob("*/checkpoints/last.ckpt")) if runs.is_dir() else []
        if not candidates:
            raise ConfigError(
                f"ckpt_path=last but no run under {runs} has checkpoints/last.ckpt: "
                "give a checkpoint file or run directory, or ckpt_path=null to start fresh"
            )
        path = max(candidates, key=lambda p: (p.stat().st_mtime, str(p)))
    else:
        path = Path(ckpt_path)
        if path.is_dir():
            path = path / "checkpoints" / "last.ckpt"
            if not path.is_file():
                raise ConfigError(
                    f"ckpt_path={ckpt_path} is a folder without checkpoints/last.ckpt: "
                    "give a run directory, a .ckpt file or `last`"
                )
        elif not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path} does not exist: give a .ckpt file, a run directory "
                "or `last` (the newest run of this name)"
            )
    check_checkpoint(path, key=f"ckpt_path={ckpt_path}")
    return str(path)


def check_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load `path` with torch's safe loading and check it is a Lightning checkpoint; return it."""
    where = f"{key}" if key.endswith(str(path)) else f"{key} ({path})"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure inside torch means an unusable file
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise ConfigError(
                f"{where} holds a pickled Python object ({unsafe.group(1)}) that safe loading "
                "(torch.load(weights_only=True)) refuses: load only checkpoints gradwatch wrote"
            ) from error
        # torch's messages run to a dozen lines about weights_only: keep the unpickler's
        # complaint (garbage) or the first line (a broken zip archive).
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        reason = detail.group(1) if detail else (str(error).strip() or type(error).__name__)
        raise ConfigError(
            f"{where} is corrupted, truncated or not a checkpoint "
            f"(torch.load: {reason.splitlines()[0].strip().split('. ')[0]})"
        ) from error
    missing = [
        k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint
    ]
    if missing:
        raise ConfigError(f"{where} is not a Lightning checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def describe_write_error(error: OSError, run_dir: str | Path) -> str:
    """One line for a write that failed during training (disk full, read-only folder): which
    file, why, and whether the run's last checkpoint is still whole to resume from."""
    where = error.filename or run_dir
    message = f"cannot write {where}: {error.strerror or error}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (the disk is full)"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        message += " (the folder is read-only)"
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        try:
            step = check_checkpoint(last)["global_step"]
        except ConfigError:
            return message + f". {last} is damaged: resume from an earlier run"
        return message + f". {last} (step {step}) is whole: resume with ckpt_path={run_dir}"
    return message + ". No checkpoint was written before: the run cannot be resumed"


class CheckOutputBeforeRun(Callback):
    """A Hydra callback: report an unwritable output folder before Hydra creates the run
    directory (Hydra's own mkdir failure prints a traceback).

    Register it in `conf/config.yaml`:

        hydra:
          callbacks:
            check_output:
              _target_: gradwatch.validate.CheckOutputBeforeRun
    """

    def _check(self, config: DictConfig, dir_key: str) -> None:
        try:
            path = OmegaConf.select(config, dir_key)
        except OmegaConfBaseException:
            path = OmegaConf.select(config, "paths.root", default=None)
        problem = writable_problem(path) if path is not None else None
        if problem is None:
            return
        error = ConfigError(f"paths.root={config.paths.root} cannot be written: {problem}")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise error
        # Hydra has not set up logging yet: a plain line on stderr, and Hydra's exit code for
        # config errors it finds itself.
        print(f"Error in config: {error}", file=sys.stderr)
        sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
