"""How a run finds its directory and its processes: run ids that never collide, a resumed run
back in its own directory, and DDP processes that start the right job inside a Hydra multirun.
"""

import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from gradwatch.resume import resolve_checkpoint

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# What Lightning's subprocess launcher sets in the launching process's environment.
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def run_id() -> str:
    """The run directory's name. Two runs started in the same second must not share one: the
    timestamp carries microseconds and the process id. Processes started together by a cluster
    launcher (torchrun, srun) each compose the config and must agree on one directory: they take
    the launcher's id of the job instead."""
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun_{os.environ['TORCHELASTIC_RUN_ID']}"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
        return f"slurm_{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S_%f}_{os.getpid()}"


# The overrides part of a run folder's name, in bytes: long enough for a handful of overrides,
# short enough to read in TensorBoard's run list (and far below a folder name's 255 bytes).
RUN_LABEL_BYTES = 96


def run_folder(overrides: str, stamp: str) -> str:
    """A single run's folder name: what the command line changed, then `stamp` (its run id), e.g.
    `optimizer=adam,optimizer.lr=0.05@2026-12-03_21-50-58_123456_4242`, so TensorBoard's run list
    tells an SGD run from an Adam run by its first words; a run without overrides is just `stamp`.
    `overrides` is Hydra's `job.override_dirname` (sorted, less `job.config.override_dirname.
    exclude_keys`). One folder level, as before: whatever finds runs at `<root>/<name>/*` still
    does. A `/` in a value would nest folders: it becomes `_`. A label too long to read is cut
    and ends in a hash of the whole, so different overrides still get different names."""
    label = overrides.replace("/", "_")
    raw = label.encode()
    if len(raw) > RUN_LABEL_BYTES:
        digest = hashlib.sha1(raw).hexdigest()[:8]
        label = raw[: RUN_LABEL_BYTES - 9].decode(errors="ignore") + "_" + digest
    return f"{label}@{stamp}" if label else stamp


def gpus_per_node(accelerator: str, devices: int) -> int | None:
    """The GPUs a SLURM job asks for on each node (conf/hydra/launcher/slurm.yaml): the trainer's
    devices when it trains on GPUs; None (ask for none) when it trains on CPUs."""
    return devices if accelerator in ("gpu", "cuda") else None


# `${run_id:}` in conf/config.yaml; cached, so every reference in one process sees one value.
OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_folder", run_folder, use_cache=True, replace=True)
OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node, replace=True)


def quote_run_paths(args: list[str]) -> list[str]:
    """`args` with a `ckpt_path=<run folder>` that Hydra cannot parse quoted for Hydra. A run
    folder named by its overrides holds `=`, `,` and brackets (`optimizer=adam@<time>`), which
    Hydra reads as syntax, yet the path is what the resume hint prints and users paste: a
    checkpoint path is never a Hydra expression, so it is taken as the plain string it is."""
    parser = OverridesParser.create()
    quoted = []
    for arg in args:
        if arg.startswith("ckpt_path="):
            try:
                parser.parse_override(arg)
            except Exception:  # noqa: BLE001 - Hydra's grammar error: the value is a path
                value = arg.removeprefix("ckpt_path=").replace("\\", "\\\\").replace("'", "\\'")
                arg = f"ckpt_path='{value}'"
        quoted.append(arg)
    return quoted


def resume_arguments(args: list[str]) -> list[str]:
    """What to add to the command line when it resumes a run (`ckpt_path=...`) in its own
    directory: the overrides that made the run (its `overrides.yaml`), but for keys the command
    line sets itself, so `make train ckpt_path=<run>` continues the run as it was; and
    `hydra.run.dir=<run>`, so it continues there instead of in a new directory. [] otherwise.
    Bad values are left for Hydra and check_config to report."""
    if not any(a.startswith("ckpt_path=") for a in args) or any(
        a in ("-m", "--multirun") or a.startswith("hydra.") for a in args
    ):
        return []
    overrides = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    try:
        # Hydra's own parser: ckpt_path='outputs/my run/...' is the path without its quotes.
        given = {o.key_or_group: o for o in parser.parse_overrides(overrides)}
        if given["ckpt_path"].value() is None:
            return []
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        checkpoint = Path(
            resolve_checkpoint(str(given["ckpt_path"].value()), cfg.paths.root, cfg.name)
        )
    except Exception:  # noqa: BLE001 - reported properly once Hydra runs the job
        return []
    finally:
        GlobalHydra.instance().clear()
    if checkpoint.parent.name != "checkpoints":
        return []
    run_dir = checkpoint.parent.parent
    try:
        saved = [str(o) for o in OmegaConf.load(run_dir / "overrides.yaml")]
        saved_keys = [o.key_or_group for o in parser.parse_overrides(saved)]
    except Exception:  # noqa: BLE001 - no record (an older run): the command line as given
        saved, saved_keys = [], []
    # Where the run lives and how it is resumed come from this command line, not the record.
    own = [
        override
        for override, key in zip(saved, saved_keys, strict=True)
        if key not in given and key != "ckpt_path" and not key.startswith(("paths.", "hydra."))
    ]
    # Quoted, so a folder with spaces, quotes or non-ASCII letters is one value to Hydra.
    quoted = str(run_dir).replace("'", "\\'")
    return [*own, f"hydra.run.dir='{quoted}'"]


@contextmanager
def ddp_processes_for_this_job() -> Iterator[None]:
    """In a Hydra multirun, makes Lightning's DDP subprocess launcher start this job, not the sweep.

    The launcher starts each extra process as `sys.argv` plus `hydra.run.dir=<hydra.run.dir>`.
    In a multirun, sys.argv holds `-m` and every sweep value: each child would run a sweep of its
    own (a second sweep directory, its jobs paired with the parent's by luck), and the next job
    would reuse the first job's process group (Lightning leaves LOCAL_RANK set and the group up).
    So: the job's own overrides and directory for the children, then the launcher's environment
    and process group taken down, so the next job starts its own processes. Processes started
    by torchrun or srun (LOCAL_RANK already set) each run the whole sweep in step: left alone.

    A process started with `python -m <module>` has its children started with `python -m
    <module>`: under Hydra's submitit launcher the module is submitit's job runner, which takes
    no overrides, so the children are started as `python -m gradwatch.train` instead.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun or "LOCAL_RANK" in os.environ:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, run_dir = sys.argv, hydra_cfg.run.dir
    env = {key: os.environ.get(key) for key in DDP_LAUNCH_ENV}
    sys.argv = [argv[0], *hydra_cfg.overrides.task]
    main = sys.modules["__main__"]
    main_spec = getattr(main, "__spec__", None)
    if main_spec is not None:
        main.__spec__ = importlib.util.find_spec("gradwatch.train")
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        main.__spec__ = main_spec
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
