"""Resuming a run: which checkpoint, whether it fits the configured run, and one process per run.

A resume is checked before anything is written into the run: a checkpoint that cannot continue
this config is refused in a line naming the difference, so a failed resume leaves the run
byte-for-byte as it was. The settings of a resumed run are the run's own: only the keys of
:data:`MAY_CHANGE_ON_RESUME` may differ (a longer run is the normal case), so `config.yaml`
always says what trained it.
"""

import errno
import fcntl
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gradwatch.validate import ConfigError, build_component, build_optimizer

CHECKPOINT_KEYS = ("state_dict", "global_step", "epoch")
# What a resume may change: how long the run trains, and what only the console shows. Anything
# else would either be ignored (Lightning restores the optimizer's lr from the checkpoint) or
# change the run's math half-way while config.yaml claims one setting for all of it.
MAY_CHANGE_ON_RESUME = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "print_every",
    "speedups",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "name",
    "ckpt_path",
    "paths",
)
# At most this many differences are spelled out in a refusal; the rest are counted.
SHOWN_DIFFERENCES = 4
# A key one config has and the other has not (sgd's momentum against adam's betas).
_ABSENT = object()


class RunComplete(Exception):
    """The checkpoint already holds every epoch the config asks for: nothing to train."""


class RunInUse(Exception):
    """Another process is training the run directory."""


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
            checkpoint, needs unsafe (pickle) loading, or holds values that cannot resume.
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
    """Load `path` with torch's safe loading, check it is a Lightning checkpoint whose step,
    epoch and weights can resume, and return it."""
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
    for counter in ("global_step", "epoch"):
        value = checkpoint[counter]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"{where} is damaged: its {counter} is {value!r}, not an integer >= 0"
            )
    weights = checkpoint["state_dict"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise ConfigError(f"{where} is damaged: its state_dict is not a dict of tensors")
    bad = [name for name, value in weights.items() if not value.isfinite().all()]
    if bad:
        raise ConfigError(
            f"{where} holds weights that are not finite ({', '.join(bad)}): a diverged run "
            "cannot continue; resume from an earlier checkpoint or start a new run"
        )
    return checkpoint


def epochs_done(checkpoint: dict[str, Any]) -> int:
    """How many epochs the checkpoint has finished training. A checkpoint saved after the last
    batch of an epoch, before Lightning closed the epoch, counts that epoch: resuming it only
    runs the epoch's end."""
    try:
        fit_loop = checkpoint["loops"]["fit_loop"]
        epochs = fit_loop["epoch_progress"]["current"]
        batches = fit_loop["epoch_loop.batch_progress"]
        in_progress = epochs["started"] > epochs["processed"]
        return epochs["processed"] + int(in_progress and batches["is_last_batch"])
    except (KeyError, TypeError):  # a checkpoint without loop state: its epoch counter
        return checkpoint["epoch"]


def check_resume(cfg: DictConfig, checkpoint_path: str) -> None:
    """Raise ConfigError if the checkpoint cannot continue the configured run; RunComplete if
    it already holds every epoch the config asks for. Nothing is written."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    where = f"ckpt_path ({checkpoint_path})"
    run_dir = Path(checkpoint_path).parent.parent
    if (run_dir / "config.yaml").is_file() and Path(checkpoint_path).parent.name == "checkpoints":
        check_settings_unchanged(cfg, run_dir / "config.yaml", where)
    check_model_and_optimizer(cfg, checkpoint, where)
    done, asked, step = epochs_done(checkpoint), cfg.trainer.max_epochs, checkpoint["global_step"]
    if asked < done:
        raise ConfigError(
            f"trainer.max_epochs={asked} but {where} has already trained {done} epochs (step "
            f"{step}): give trainer.max_epochs > {done} to train on"
        )
    complete = f"The run in {run_dir} is complete at step {step} ({done} epochs"
    if stopped_early(checkpoint):
        raise RunComplete(
            f"{complete}, ended by early stopping): nothing to resume, nothing changed. Early "
            "stopping would end it again: to train longer, start a new run"
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    if asked == done or (isinstance(max_steps, int) and 0 <= max_steps <= step):
        key, more = (
            ("trainer.max_epochs", 2 * done) if asked == done else ("trainer.max_steps", 2 * step)
        )
        raise RunComplete(
            f"{complete}, {key}={asked if asked == done else max_steps}): nothing to resume, "
            f"nothing changed. To train on, raise {key} "
            f"(e.g. make train ckpt_path={run_dir} {key}={more})"
        )


def stopped_early(checkpoint: dict[str, Any]) -> bool:
    """Whether Lightning's EarlyStopping ended the run the checkpoint holds."""
    callbacks = checkpoint.get("callbacks") or {}
    return any(
        name.startswith("EarlyStopping") and isinstance(state, dict) and state.get("stopped_epoch")
        for name, state in callbacks.items()
    )


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"optimizer.lr": 0.01, ...}: every leaf of a plain nested dict, by dotted key."""
    if not isinstance(node, dict):
        return {prefix: node}
    found: dict[str, Any] = {}
    for key, value in node.items():
        found.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE_ON_RESUME)


def _refuse_differences(where: str, differences: list[tuple[str, Any, Any]]) -> None:
    if not differences:
        return
    shown = [f"{key}={_plain(old)} (now {_plain(new)})" for key, old, new in differences][
        :SHOWN_DIFFERENCES
    ]
    more = len(differences) - len(shown)
    listed = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
    keys = " ".join(key for key, _, _ in differences[:SHOWN_DIFFERENCES])
    raise ConfigError(
        f"{where} was trained with {listed}: a resumed run keeps its own settings (only "
        f"the run's length and what the console shows may change). Drop the override of "
        f"{keys}, or start a new run (ckpt_path=null)"
    )


def _plain(value: Any) -> str:
    if value is _ABSENT:
        return "(not set)"
    if isinstance(value, list):
        return f"[{','.join(map(str, value))}]"
    return str(value)


def check_settings_unchanged(cfg: DictConfig, saved_config: Path, where: str) -> None:
    """The config must match the run's `config.yaml` but for :data:`MAY_CHANGE_ON_RESUME`."""
    try:
        saved = leaves(OmegaConf.to_container(OmegaConf.load(saved_config)))
    except Exception as error:  # noqa: BLE001 - a damaged record: say so, do not guess
        raise ConfigError(
            f"{saved_config} (the run's settings) cannot be read ({error}): resume needs it "
            "to check that the run continues as it started"
        ) from error
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    current = leaves(OmegaConf.to_container(job, resolve=True))
    # A value copied from another key (data.seed: ${seed}) is that key's, reported there; one
    # made from where the run lives (${paths.output_dir}/checkpoints) or from the command line
    # (${hydra:job.override_dirname}) follows the run, not a setting.
    raw = leaves(OmegaConf.to_container(job, resolve=False))
    derived = {k for k, v in raw.items() if isinstance(v, str) and "${" in v}
    differences = [
        (key, saved.get(key, _ABSENT), current.get(key, _ABSENT))
        for key in sorted(saved.keys() | current.keys())
        if not _may_change(key)
        and key not in derived
        and not _same(saved.get(key, _ABSENT), current.get(key, _ABSENT))
    ]
    _refuse_differences(where, differences)


def _same(a: Any, b: Any) -> bool:
    # 0 and 0.0 are one setting; true and 1 are not.
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return a == b or (numbers and math.isnan(a) and math.isnan(b))


def check_model_and_optimizer(cfg: DictConfig, checkpoint: dict[str, Any], where: str) -> None:
    """The checkpoint's network and optimizer must be the configured ones: the recorded
    hyperparameters first (they name the keys), then the tensors themselves (a checkpoint
    without hyperparameters, or edited ones)."""
    recorded = checkpoint.get("hyper_parameters")
    if isinstance(recorded, dict):
        configured = {
            "model": {k: v for k, v in _container(cfg.model).items() if not k.startswith("_")},
            "optimizer": _container(cfg.optimizer),
        }
        saved = {"model": {k: v for k, v in recorded.items() if k != "optimizer"}}
        saved["optimizer"] = recorded.get("optimizer") or {}
        old, new = leaves(saved), leaves(configured)
        _refuse_differences(
            where,
            [
                (key, old.get(key, _ABSENT), new.get(key, _ABSENT))
                for key in sorted(old.keys() | new.keys())
                if not _same(old.get(key, _ABSENT), new.get(key, _ABSENT))
            ],
        )
    module = build_component("model", cfg.model)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
    if expected != found:
        raise ConfigError(
            f"{where} holds another network ({_shapes(found)}) than "
            f"model.layer_sizes={_plain(list(cfg.model.layer_sizes))} builds "
            f"({_shapes(expected)}): resume with the run's own model settings"
        )
    states = checkpoint.get("optimizer_states") or []
    optimizer = build_optimizer(cfg.optimizer)
    expected_keys = set(optimizer.param_groups[0]) - {"params"}
    for state in states:
        groups = state.get("param_groups") if isinstance(state, dict) else None
        found_keys = set(groups[0]) - {"params"} if groups else set()
        if found_keys != expected_keys:
            raise ConfigError(
                f"{where} holds the state of another optimizer (settings "
                f"{sorted(found_keys)}) than optimizer._target_={cfg.optimizer._target_} "
                f"(settings {sorted(expected_keys)}): resume with the run's own optimizer"
            )


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    listed = [f"{name} {list(shape)}" for name, shape in shapes.items()]
    return ", ".join(listed[:SHOWN_DIFFERENCES]) + (", ..." if len(listed) > 4 else "")


def merged_overrides(saved: list[str], resumed: list[str]) -> list[str]:
    """The overrides that made the run, after a resume: the run's own, with the ones the resume
    changed (trainer.max_epochs=...) replaced or added; `ckpt_path` is how, not what: left out."""

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    changed = {
        key(o): o for o in resumed if key(o) != "ckpt_path" and not key(o).startswith("hydra.")
    }
    merged = [changed.pop(key(o), o) for o in saved]
    return merged + list(changed.values())


class RunLock:
    """An exclusive lock on a run directory while a process trains it, so two processes never
    write into one run. It is the operating system's lock on the folder itself (flock): it
    writes nothing, and it goes when the process goes, however it ends (kill -9 included), so a
    stale lock cannot exist."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (the folder is made if missing), or raise RunInUse."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunInUse(
                    f"{self.run_dir} is being trained by another process: wait for it to end, "
                    "or stop it (Ctrl-C) and resume then"
                ) from error
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
