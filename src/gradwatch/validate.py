"""Checks a composed config before anything trains, so a typo costs seconds, not a run.

Hydra itself rejects unknown group options and unknown keys (struct mode). Each option is then
checked once, by what uses it:

- the components (the datamodule, the model, each callback) check their own arguments in their
  constructors; :func:`check_config` builds them from the config, which writes nothing and
  trains nothing, and reports what they say (`<key>: <their message>`);
- what no component of gradwatch owns is checked here, in :data:`RULES`: the top-level keys,
  the Trainer's and the optimizer's arguments (Lightning and torch would refuse a bad one only
  in the middle of `fit`, or not at all), and the arguments of Lightning's EarlyStopping that
  it does not check itself;
- then what needs the whole config or the machine: the network against the dataset, the GPU,
  writable output folders, the checkpoint to resume from.

Every message names the key, the value given and what is allowed.
"""

import logging
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradwatch.data import DATASET_INFO

log = logging.getLogger("gradwatch")

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning's own lists: what Trainer(strategy=..., precision=...) accepts.
STRATEGIES = ("auto", *StrategyRegistry.available_strategies())
PRECISIONS = tuple(value for literal in get_args(_PRECISION_INPUT) for value in get_args(literal))
# trainer=fsdp's strategy: FSDP2 (fully_shard), the one sharded strategy the monitor measures.
MODEL_PARALLEL = "lightning.pytorch.strategies.ModelParallelStrategy"
# What the model logs through self.log, so what EarlyStopping can watch.
LOGGED_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
# Config nodes that a component builds from (the keys are its constructor's arguments): the
# component checks them itself. `callbacks.*`: each callback.
COMPONENTS = ("data", "model", "callbacks.*", "logger.*")
# What a component's constructor raises for an argument it refuses (Lightning's callbacks raise
# MisconfigurationException, its loggers ModuleNotFoundError for a missing package).
COMPONENT_ERRORS = (ValueError, TypeError, MisconfigurationException, ImportError)
# Every float the optimizer holds is used in float32 arithmetic in its step.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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
        text = f"a number in {'(' if low_open else '['}{low}, {high:g}{')' if high_open else ']'}"
    return ok, text


def _one_of(allowed: tuple[Any, ...] | list[Any]) -> tuple[Callable[[Any], bool], str]:
    # `v in allowed` would take True for 1 and 1.0 for 1: compare types too.
    return (
        lambda v: any(type(v) is type(a) and v == a for a in allowed),
        f"one of {list(allowed)}",
    )


def _bool(nullable: bool = False) -> tuple[Callable[[Any], bool], str]:
    text = "true or false" + (" or null" if nullable else "")
    return (lambda v: isinstance(v, bool) or (nullable and v is None)), text


def _subclass_of(base: type, name: str) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        try:
            return isinstance(v, str) and issubclass(get_class(v), base)
        except Exception:  # noqa: BLE001 - any import failure means the name does not work
            return False

    return ok, f"the import path of {name} or of a subclass"


def _stays_inside(name: str) -> bool:
    """A run name keeps the run under paths.root: a relative path that never climbs out."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _betas(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(_number(0, 1)[0](b) for b in value)
    )


def _devices(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return len(value) > 0 and all(_is_int(d) and d >= 0 for d in value)
    return value == "auto" or (_is_int(value) and (value >= 1 or value == -1))


# Key -> (check, what is allowed), for keys that no component of gradwatch checks. A key absent
# from the config is not checked: groups differ (adam has betas, sgd has momentum) and callbacks
# can be dropped. The components' own arguments are not here: see COMPONENTS.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # Lightning's seed_everything refuses a seed outside numpy's range, after this check.
    "seed": (
        lambda v: _is_int(v) and min_seed_value <= v <= max_seed_value,
        f"an integer in [{min_seed_value}, {max_seed_value}]",
    ),
    "name": (
        lambda v: isinstance(v, str) and _stays_inside(v),
        "a folder name under paths.root (not empty, not absolute, no '..')",
    ),
    "paths.root": (lambda v: isinstance(v, str) and v.strip() != "", "a folder path, not empty"),
    "speedups": _bool(),
    # lightning.pytorch.Trainer's arguments (conf/trainer/).
    "trainer._target_": _subclass_of(Trainer, "lightning.pytorch.Trainer"),
    "trainer.max_epochs": _int_at_least(1),
    "trainer.accelerator": _one_of(ACCELERATORS),
    "trainer.devices": (_devices, "an integer >= 1, -1 (all), 'auto' or a list of device ids"),
    "trainer.num_nodes": _int_at_least(1),
    "trainer.strategy": (
        lambda v: _one_of(STRATEGIES)[0](v) or isinstance(v, dict),
        f"{_one_of(STRATEGIES)[1]}, or trainer=fsdp's node",
    ),
    # trainer=fsdp (conf/trainer/fsdp.yaml): FSDP2 through Lightning's ModelParallelStrategy.
    "trainer.strategy._target_": _one_of((MODEL_PARALLEL,)),
    "trainer.strategy.data_parallel_size": _int_at_least(1),
    "trainer.strategy.tensor_parallel_size": (
        lambda v: type(v) is int and v == 1,
        "1: tensor parallelism is not supported (the gradient monitor sums each process's shard"
        " of a parameter, which counts a replicated parameter once per process)",
    ),
    "trainer.strategy.save_distributed_checkpoint": (
        lambda v: v is False,
        "false: checkpoints/last.ckpt is one file, gathered by rank zero, which resume reads"
        " (a distributed checkpoint is a folder of shards)",
    ),
    "trainer.precision": _one_of(PRECISIONS),
    "trainer.log_every_n_steps": _int_at_least(1),
    "trainer.check_val_every_n_epoch": _int_at_least(1, nullable=True),
    "trainer.num_sanity_val_steps": (
        _int_at_least(-1)[0],
        "an integer >= 0, or -1 (the whole validation set)",
    ),
    "trainer.accumulate_grad_batches": _int_at_least(1),
    "trainer.gradient_clip_val": (
        lambda v: v is None or _number(0)[0](v),
        "a number >= 0 or null",
    ),
    "trainer.gradient_clip_algorithm": _one_of(("norm", "value")),
    "trainer.deterministic": _one_of((True, False, "warn", None)),
    "trainer.enable_progress_bar": _bool(),
    "trainer.enable_model_summary": _bool(),
    "trainer.enable_checkpointing": _bool(),
    "trainer.profiler": _one_of((None, "simple", "advanced", "pytorch")),
    # The optimizer (conf/optimizer/): MLPModule.configure_optimizers calls the partial with
    # the model's parameters, inside fit; torch checks less (it takes lr=0 and momentum=1).
    "optimizer._target_": _subclass_of(torch.optim.Optimizer, "torch.optim.Optimizer"),
    "optimizer._partial_": (lambda v: v is True, "true (the module calls it with its parameters)"),
    "optimizer.lr": (
        _number(0, FLOAT32_MAX, low_open=True, high_open=False)[0],
        f"a number > 0 that float32 holds (<= {FLOAT32_MAX:.3g})",
    ),
    "optimizer.momentum": _number(0, 1),
    "optimizer.weight_decay": (
        _number(0, FLOAT32_MAX, high_open=False)[0],
        f"a number >= 0 that float32 holds (<= {FLOAT32_MAX:.3g})",
    ),
    "optimizer.alpha": _number(0, 1, high_open=False),
    "optimizer.betas": (_betas, "two numbers in [0, 1), e.g. [0.9,0.999]"),
    # Lightning's EarlyStopping (conf/callbacks/early_stopping.yaml) checks only its `mode`
    # itself (that one is asked, with the other callbacks); these it would trip on mid-run.
    "callbacks.early_stopping.monitor": _one_of(LOGGED_METRICS),
    "callbacks.early_stopping.patience": _int_at_least(0),
    "callbacks.early_stopping.min_delta": _number(0),
    "callbacks.early_stopping.check_on_train_epoch_end": _bool(nullable=True),
    "callbacks.early_stopping.strict": _bool(),
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def rule_problems(cfg: DictConfig) -> dict[str, str]:
    """Key -> what is wrong with it, for every key of :data:`RULES` whose value breaks its rule."""
    problems = {}
    for key, (ok, allowed) in RULES.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        # A value copied from another key (name: ${data.name}) is reported there, once.
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        if OmegaConf.is_interpolation(parent, leaf):
            continue
        try:
            value = _plain(OmegaConf.select(cfg, key, throw_on_missing=True))
        except OmegaConfBaseException as error:
            problems[key] = f"{key}: {str(error).splitlines()[0]}"
            continue
        if not ok(value):
            problems[key] = f"{_show(key, value)} is not allowed: expected {allowed}"
    return problems


def component_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(key, node) of every config node that a component is built from (:data:`COMPONENTS`)."""
    nodes = []
    for pattern in COMPONENTS:
        if pattern.endswith(".*"):
            group = pattern[:-2]
            children = cfg.get(group) or {}
            nodes += [(f"{group}.{name}", node) for name, node in children.items()]
        else:
            nodes.append((pattern, cfg.get(pattern)))
    return [(key, node) for key, node in nodes if isinstance(node, DictConfig)]


def _copied_from(node: DictConfig) -> set[str]:
    """The keys that values of `node` are copied from: {"seed"} for data (seed: ${seed})."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.update(re.findall(r"\$\{([\w.]+)\}", value))
        elif isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                walk(item)

    walk(OmegaConf.to_container(node, resolve=False))
    return found


def build_component(key: str, node: DictConfig) -> Any:
    """The component that `node` (at `key`) configures, built as training builds it. Building
    writes nothing and trains nothing; the model's weights are drawn without moving the global
    random state."""
    if key == "model":
        with torch.random.fork_rng(devices=[]):
            # The optimizer is the module's to keep, not to check: see check_optimizer_steps.
            return instantiate(node, _recursive_=False)
    return instantiate(node)


def build_optimizer(node: DictConfig) -> torch.optim.Optimizer:
    """The optimizer that `node` configures, built on a throwaway parameter and stepped once,
    as training will (torch checks some arguments only when the optimizer is built, and some
    only in its step). Raises what torch raises, a failed step as ValueError."""
    parameter = torch.zeros(2, requires_grad=True)
    optimizer = instantiate(node)([parameter])
    parameter.grad = torch.ones(2)
    try:
        optimizer.step()
    except RuntimeError as error:  # e.g. a setting that overflows float32 in the step
        raise ValueError(f"{node._target_} cannot step with these settings: {error}") from error
    return optimizer


def check_optimizer_steps(cfg: DictConfig) -> None:
    """The optimizer's values have passed RULES; torch has the last word on their combination
    (nesterov without momentum) and on keys RULES does not know (+optimizer.foo=1)."""
    try:
        build_optimizer(cfg.optimizer)
    except InstantiationException as error:
        cause = error.__cause__
        if not isinstance(cause, COMPONENT_ERRORS):
            raise
        raise ConfigError(f"optimizer: {_one_line(str(cause))}") from error
    except COMPONENT_ERRORS as error:
        raise ConfigError(f"optimizer: {_one_line(str(error))}") from error


def component_problem(key: str, node: DictConfig) -> str | None:
    """What the component at `key` says about its arguments (built with :func:`build_component`),
    as `<key>: <its message>`, or its message alone when that names the key; None if it builds."""
    try:
        build_component(key, node)
        return None
    except InstantiationException as error:
        cause = error.__cause__
        if str(error).startswith("Error locating target"):
            # Hydra's cause: "Error loading 'x':" / the import error / "Are you sure that...".
            lines = str(cause).splitlines() if cause else []
            reason = _one_line(lines[1]) if len(lines) > 1 else "not found"
            target = _show(f"{key}._target_", node.get("_target_"))
            return f"{target} cannot be imported: {reason}"
        if cause is None:  # Hydra's own refusal of the target (its instantiate policy)
            message = _one_line(str(error).split("\nfull_key:")[0])
        elif isinstance(cause, COMPONENT_ERRORS):
            message = _one_line(str(cause))
        else:  # anything else inside a constructor is a bug, not a config value: as it is
            raise
    except COMPONENT_ERRORS as error:
        message = _one_line(str(error))
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
    return message if message.startswith(f"{key}.") else f"{key}: {message}"


def check_values(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every value that cannot run: the keys of :data:`RULES`,
    then what each component says about its own (a component is not asked about a value it
    copies from a key already reported, so `seed=abc` is reported once, at `seed`)."""
    reported = rule_problems(cfg)
    problems = list(reported.values())
    for key, node in component_nodes(cfg):
        if _copied_from(node) & set(reported):
            continue
        problem = component_problem(key, node)
        if problem:
            problems.append(problem)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} values cannot run:\n  " + "\n  ".join(problems))


def check_model_fits_data(cfg: DictConfig) -> None:
    """The network's first and last sizes and the loss must suit the dataset."""
    # The datamodule and the model have checked each value (check_values): here, the two
    # together.
    info = DATASET_INFO[cfg.data.name]
    sizes, loss = list(cfg.model.layer_sizes), cfg.model.loss
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


def check_early_stopping_has_its_metric(cfg: DictConfig) -> None:
    """EarlyStopping (strict) on a val/ metric stops the run with an error at its first check if
    validation has not run by then: a dataset without a held-out split (xor), or a check after a
    training epoch that did not validate."""
    node = (cfg.get("callbacks") or {}).get("early_stopping")
    if not isinstance(node, DictConfig) or not node.get("strict", True):
        return
    monitor = node.get("monitor")
    if not (isinstance(monitor, str) and monitor.startswith("val/")):
        return
    given = f"callbacks.early_stopping.monitor={monitor}"
    if not len(build_component("data", cfg.data).val_x):
        raise ConfigError(
            f"{given} but data={cfg.data.name} has no validation split: "
            "use callbacks.early_stopping.monitor=train/loss"
        )
    every = cfg.trainer.get("check_val_every_n_epoch", 1)
    if node.get("check_on_train_epoch_end") and every != 1:
        raise ConfigError(
            f"{given} is checked after every training epoch, but validation runs every "
            f"trainer.check_val_every_n_epoch={every}: "
            "use callbacks.early_stopping.check_on_train_epoch_end=false (check after validation)"
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


def check_sharding(cfg: DictConfig) -> None:
    """Under trainer=fsdp every process holds a shard: the data-parallel size is the number of
    processes (Lightning refuses other products only once the processes have started)."""
    strategy = cfg.trainer.get("strategy")
    if not isinstance(strategy, DictConfig):
        return
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if not _is_int(devices) or devices < 1:
        raise ConfigError(
            f"trainer.devices={devices!r} but trainer=fsdp needs a number of processes per node:"
            " use trainer.devices=<an integer >= 1>"
        )
    size = strategy.get("data_parallel_size")
    if size != devices * nodes:
        raise ConfigError(
            f"trainer.strategy.data_parallel_size={size} but trainer.devices={devices} x "
            f"trainer.num_nodes={nodes} processes each hold a shard: use "
            f"trainer.strategy.data_parallel_size={devices * nodes}"
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
    """(key, path) of every folder the run writes into: the runs' root and the run directory,
    the checkpoint folders of callbacks, the save_dir of loggers."""
    keys = ["paths.root", "paths.output_dir"]
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
