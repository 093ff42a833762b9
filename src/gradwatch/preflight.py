"""Everything checked before a run writes a byte: the config, the machine, the checkpoint to
resume from, and that no other process is training the run.

:func:`check_config` is the one list of checks. The command line runs it from a Hydra callback,
:class:`CheckBeforeRun`, before Hydra makes the run directory or opens `train.log`: a refused
config leaves nothing behind, and a refused resume leaves its run as it was. `train()` runs it
again, for callers that do not go through Hydra's command line (tests, sweeps' jobs).
"""

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from gradwatch.data import DATASET_INFO
from gradwatch.resume import (
    RunComplete,
    RunInUse,
    RunLock,
    check_resume,
    leaves,
    resolve_checkpoint,
)
from gradwatch.validate import (
    COMPONENT_ERRORS,
    ConfigError,
    check_accelerator,
    check_early_stopping_has_its_metric,
    check_model_fits_data,
    check_optimizer_steps,
    check_sharding,
    check_values,
    check_writable_outputs,
    writable_problem,
)

# The environment of processes started together by a cluster launcher: torchrun, SLURM, or by
# hand as Lightning documents it (every node: MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE).
LAUNCHED_BY = (("TORCHELASTIC_RUN_ID",), ("SLURM_NTASKS",), ("MASTER_ADDR", "NODE_RANK"))
# Training holds weights, gradients and up to two optimizer states (Adam) per parameter.
COPIES_PER_PARAMETER = 4
# Generating and splitting a dataset holds a few copies of it at once.
COPIES_PER_SAMPLE = 4
GIB = 2**30

# Locks taken by CheckBeforeRun: held until the process ends.
_held_locks: list[RunLock] = []


def check_config(cfg: DictConfig) -> str | None:
    """Raise ConfigError for what in `cfg` cannot run, RunComplete for a resume with nothing left
    to train; return the checkpoint to resume from, or None to start fresh.

    Order: values that do not resolve, sizes that would not fit in memory (before anything is
    built), every value (all problems at once), the optimizer built and stepped, the network
    against the dataset and early stopping against validation, then the machine (GPU, nodes,
    the shards of trainer=fsdp, the Trainer, writable folders), then the checkpoint.
    """
    check_resolves(cfg)
    check_fits_in_memory(cfg)
    check_values(cfg)
    check_optimizer_steps(cfg)
    check_model_fits_data(cfg)
    check_early_stopping_has_its_metric(cfg)
    check_accelerator(cfg)
    check_nodes(cfg)
    check_sharding(cfg)
    check_trainer_builds(cfg)
    check_writable_outputs(cfg)
    checkpoint = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.root, cfg.name)
    if checkpoint:
        check_resume(cfg, checkpoint)
    return checkpoint


def available_memory() -> int:
    """Bytes this process can still allocate: the machine's available memory, or what is left
    under the container's limit when that is less."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _positive_ints(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_fits_in_memory(cfg: DictConfig) -> None:
    """The network and the dataset must fit in memory: a size typed with three zeros too many
    is refused with its size, before an allocation fails or the machine starts swapping. Sizes
    that are not well-formed numbers are left to :func:`check_values`."""
    sizes = OmegaConf.select(cfg, "model.layer_sizes", default=None)
    sizes = list(sizes) if OmegaConf.is_list(sizes) else None
    n_samples = OmegaConf.select(cfg, "data.n_samples", default=None)
    name = OmegaConf.select(cfg, "data.name", default=None)
    needs = []
    if sizes and all(_positive_ints(n) for n in sizes):
        parameters = sum((n_in + 1) * n_out for n_in, n_out in zip(sizes, sizes[1:], strict=False))
        needs.append(
            (
                parameters * 4 * COPIES_PER_PARAMETER,
                f"model.layer_sizes=[{','.join(map(str, sizes))}] makes a network of "
                f"{parameters:,} parameters",
            )
        )
    if name in DATASET_INFO and name != "xor" and _positive_ints(n_samples):
        row = DATASET_INFO[name].num_inputs * 4 + 8  # float32 features, an int64 target
        needs.append(
            (n_samples * row * COPIES_PER_SAMPLE, f"data.n_samples={n_samples} makes a dataset")
        )
    available = available_memory()
    for need, what in needs:
        if need > available:
            raise ConfigError(
                f"{what} too large for memory: training it needs about {need / GIB:.1f} GiB, "
                f"and this machine has {available / GIB:.1f} GiB free"
            )


def check_nodes(cfg: DictConfig) -> None:
    """Several nodes need processes started together on each of them; one process alone would
    wait for the others forever."""
    nodes = cfg.trainer.get("num_nodes", 1)
    if nodes == 1 or any(all(k in os.environ for k in keys) for keys in LAUNCHED_BY):
        return
    raise ConfigError(
        f"trainer.num_nodes={nodes} needs one process per node, started together by torchrun "
        f"(torchrun --nnodes={nodes} --node-rank=<i> --master-addr=<host> ...) or SLURM "
        "(srun), or on each node by hand with MASTER_ADDR, MASTER_PORT, NODE_RANK and "
        "WORLD_SIZE set; this process was started alone and would wait for the others forever: "
        "use trainer.num_nodes=1 here (docs/distributed.md)"
    )


def check_trainer_builds(cfg: DictConfig) -> None:
    """Lightning's Trainer checks its accelerator, strategy and precision when it is built, and
    some of them only there (a strategy whose package is missing, an accelerator this machine
    lacks): build one, which writes nothing and starts no process."""
    chatter = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in chatter]
    for logger in chatter:  # "GPU available: ..." before the console is set up
        logger.setLevel(logging.WARNING)
    try:
        instantiate(
            cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, profiler=None
        )
    except InstantiationException as error:
        cause = error.__cause__
        if not isinstance(cause, (*COMPONENT_ERRORS, RuntimeError)):
            raise
        raise ConfigError(f"trainer: {' '.join(str(cause).split())}") from error
    finally:
        for logger, level in zip(chatter, levels, strict=True):
            logger.setLevel(level)


def job_config(config: DictConfig, run_dir: str | Path) -> DictConfig:
    """The job's config (no `hydra` node) as the job will see it, its `${hydra:...}` values
    resolvable now: Hydra's config is set, with `run_dir` as the job's output folder."""
    full = config.copy()
    with read_write(full.hydra.runtime), open_dict(full.hydra.runtime):
        full.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(full)
    job = full.copy()
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


def check_resolves(cfg: DictConfig) -> None:
    """Every value of the job (Hydra's own are Hydra's) must resolve: name='${name}' is
    recursive, ${oc.env:X} needs X set."""
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    for key, value in leaves(OmegaConf.to_container(job, resolve=False)).items():
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException as error:
            first_line = str(error).splitlines()[0]
            raise ConfigError(f"{key}={value!r} cannot be resolved: {first_line}") from error


def check_run_folder_resolves(config: DictConfig, dir_key: str) -> None:
    """The values, then the run's folder (`dir_key`: hydra.run.dir, hydra.sweep.dir), must
    resolve: the values first, so name='${name}' is reported at `name`."""
    check_resolves(job_config(config, "<run dir>"))
    try:
        OmegaConf.select(config, dir_key, throw_on_missing=True)
    except OmegaConfBaseException as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"{dir_key} cannot be resolved: {first_line}") from error


def _is_first_process() -> bool:
    # Lightning's DDP launcher starts the other ranks with LOCAL_RANK set; torchrun sets RANK.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _refuse(message: str, code: int) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise ConfigError(message)
    # Hydra has not set up logging yet: a plain line on stderr, and Hydra's exit code for
    # config errors it finds itself.
    print(message, file=sys.stderr)
    sys.exit(code)


class CheckBeforeRun(Callback):
    """A Hydra callback: :func:`check_config` before Hydra creates the run directory, then a
    lock on the run (:class:`~gradwatch.resume.RunLock`) for as long as the process trains it.

    Register it in `conf/config.yaml`:

        hydra:
          callbacks:
            check_before_run:
              _target_: gradwatch.preflight.CheckBeforeRun
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_run_folder_resolves(config, "hydra.run.dir")
        except ConfigError as error:
            _refuse(f"Error in config: {error}", 2)
        run_dir = Path(config.hydra.run.dir).absolute()
        lock = RunLock(run_dir) if _is_first_process() else None
        resuming = run_dir.is_dir()
        try:
            if lock and resuming:  # a resume: another process training it is told first
                lock.acquire()
            check_config(job_config(config, run_dir))
            if lock and not resuming:  # a new run: its folder is made once it is sure to run
                lock.acquire()
        except ConfigError as error:
            _refuse(f"Error in config: {error}", 2)
        except RunInUse as error:
            _refuse(f"Error: {error}", 2)
        except RunComplete as complete:
            print(complete)
            sys.exit(0)
        if lock:
            _held_locks.append(lock)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Each job is checked when it runs (a refused job is recorded, the others go on).
        try:
            check_run_folder_resolves(config, "hydra.sweep.dir")
        except ConfigError as error:
            _refuse(f"Error in config: {error}", 2)
        root = config.paths.root
        root_problem = writable_problem(root)
        if root_problem:
            _refuse(f"Error in config: paths.root={root} cannot be written: {root_problem}", 2)
