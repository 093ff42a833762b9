"""Every option in conf/ has one rule, and a bad value of it is refused before training.

The keys are read from the YAML files themselves (every leaf key of every option of data/,
model/, optimizer/, trainer/, callbacks/ and config.yaml's own), so a key added to conf/ without
a bad value below (or an exemption, with its reason) fails `test_every_key_has_a_rule`.

For each key and bad value, `check_config` must raise ConfigError with a one-line message.
Who gives the message is found out, not declared: the component the key configures (or that
copies it, as the console copies `print_every`) is built directly with the bad value. If it
refuses, the option is the component's, and check_config must say exactly what the component
says (under its config key), and validate.RULES must not check it a second time. If it does not
refuse, the option belongs to validate.py (RULES, or the checks of the machine: writable folders,
the checkpoint), whose message names the key.
"""

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from gradwatch.preflight import check_config
from gradwatch.validate import (
    COMPONENT_ERRORS,
    RULES,
    ConfigError,
    check_values,
    component_nodes,
)

GROUPS = ("data", "model", "optimizer", "trainer", "callbacks")
# callbacks/default.yaml only lists others; this composes every callback file at once.
ALL_CALLBACKS = sorted(
    p.stem for p in (CONF_DIR / "callbacks").glob("*.yaml") if p.stem != "default"
)
# What an option needs beside it to run at all (the network must fit the dataset).
TO_RUN = {
    "data=spiral": ["model.layer_sizes=[2,4,3]", "model.loss=cross_entropy"],
    "data=sine": ["model.layer_sizes=[1,4,1]"],
}
# A place under a file: no folder can ever be made there.
BLOCKER = "not_a_folder"

# Key -> bad values. Every leaf key in conf/ must be here or in EXEMPT.
BAD: dict[str, list[Any]] = {
    # config.yaml's own keys
    "name": ["", 5],
    "seed": ["abc", -1, 2**32],
    "print_every": [-1, "often"],
    "speedups": ["yes"],
    "ckpt_path": ["no/such/run"],
    "paths.root": [f"{BLOCKER}/outputs"],
    "paths.output_dir": [f"{BLOCKER}/run"],
    # data/
    "data._target_": ["gradwatch.data.NoSuchModule"],
    "data.name": ["mnist", None],
    "data.batch_size": [0, "big", 2.5],
    "data.n_samples": [0, 10.5],
    "data.noise": [-0.1, "loud"],
    "data.val_fraction": [1.0, -0.2],
    "data.seed": ["abc", 1.5],
    # model/
    "model._target_": ["gradwatch.model.NoSuchModule"],
    "model.layer_sizes": [5, [2], [2, 0, 1], [2, 2.5, 1], [2, True, 1]],
    "model.activation": ["swish", 3],
    "model.loss": ["hinge", None],
    # optimizer/
    "optimizer._target_": ["torch.nn.Linear", "torch.optim.NoSuchOptimizer"],
    "optimizer._partial_": [False],
    "optimizer.lr": [0, -0.1, "fast"],
    "optimizer.momentum": [1.0, -0.5],
    "optimizer.weight_decay": [-1],
    "optimizer.alpha": [1.5],
    "optimizer.betas": [[0.9, 1.5], [0.9]],
    # trainer/
    "trainer._target_": ["torch.nn.Linear"],
    "trainer.max_epochs": [0, "ten", True],
    "trainer.accelerator": ["tpuu"],
    "trainer.devices": [0, "two"],
    "trainer.num_nodes": [0],
    "trainer.strategy": ["dpp"],
    # trainer/fsdp.yaml: FSDP2 through ModelParallelStrategy; tensor parallelism is refused.
    "trainer.strategy._target_": ["lightning.pytorch.strategies.DDPStrategy"],
    "trainer.strategy.data_parallel_size": [0, 3],
    "trainer.strategy.tensor_parallel_size": [2],
    "trainer.strategy.save_distributed_checkpoint": [True],
    "trainer.precision": ["15-mixed", 8],
    "trainer.log_every_n_steps": [0],
    "trainer.check_val_every_n_epoch": [0],
    "trainer.num_sanity_val_steps": [-2],
    "trainer.accumulate_grad_batches": [0],
    "trainer.gradient_clip_val": [-1.0],
    "trainer.gradient_clip_algorithm": ["clip"],
    "trainer.deterministic": ["yes"],
    "trainer.enable_progress_bar": ["yes"],
    "trainer.enable_model_summary": [2],
    "trainer.enable_checkpointing": ["on"],
    "trainer.profiler": ["fast"],
    # callbacks/gradient_monitor.yaml
    "callbacks.gradient_monitor._target_": ["gradwatch.nope.GradientMonitor"],
    "callbacks.gradient_monitor.log_every_n_steps": [-1, 2.5],
    "callbacks.gradient_monitor.histogram_every_n_steps": [-5],
    "callbacks.gradient_monitor.bins": [0, "many"],
    "callbacks.gradient_monitor.histogram_min_values": [0, "few"],
    "callbacks.gradient_monitor.norm_types": ["inf", [2, -1]],
    "callbacks.gradient_monitor.log_weight_norms": ["maybe"],
    "callbacks.gradient_monitor.log_update_ratio": [3],
    "callbacks.gradient_monitor.vanishing_threshold": [-1.0],
    "callbacks.gradient_monitor.vanishing_fraction": ["small"],
    "callbacks.gradient_monitor.vanishing_patience": [0],
    "callbacks.gradient_monitor.exploding_factor": [1],
    "callbacks.gradient_monitor.exploding_window": [0],
    "callbacks.gradient_monitor.stall_update_ratio": [-3e-4],
    "callbacks.gradient_monitor.stall_loss_tol": [-0.01],
    "callbacks.gradient_monitor.stall_patience": [1],
    "callbacks.gradient_monitor.on_nonfinite": ["explode"],
    "callbacks.gradient_monitor.log_activations": ["often"],
    "callbacks.gradient_monitor.activation_histograms": [2],
    "callbacks.gradient_monitor.saturation_eps": [-1e-3],
    "callbacks.gradient_monitor.dead_fraction": [1.5],
    "callbacks.gradient_monitor.saturated_fraction": [-0.5],
    "callbacks.gradient_monitor.symmetric_fraction": [2],
    "callbacks.gradient_monitor.activation_patience": [0],
    "callbacks.gradient_monitor.every_step": ["always"],
    "callbacks.gradient_monitor.on_spike": ["ignore"],
    "callbacks.gradient_monitor.spike_window": [2],
    "callbacks.gradient_monitor.spike_sigma": [0],
    "callbacks.gradient_monitor.spike_factor": [1],
    # callbacks/console.yaml
    "callbacks.console._target_": ["gradwatch.console.NoSuchCallback"],
    "callbacks.console.print_every": [-1, 2.5],
    "callbacks.console.progress_bar": ["sometimes"],
    # callbacks/checkpoint.yaml
    "callbacks.checkpoint._target_": ["gradwatch.nope.RunCheckpoint"],
    "callbacks.checkpoint.dirpath": [f"{BLOCKER}/checkpoints", None],
    "callbacks.checkpoint.every_n_train_steps": [0, None, "often"],
    # callbacks/early_stopping.yaml
    "callbacks.early_stopping._target_": ["lightning.pytorch.callbacks.NoSuchStopping"],
    "callbacks.early_stopping.monitor": ["train/los", ""],
    "callbacks.early_stopping.mode": ["lowest"],
    "callbacks.early_stopping.patience": [-1, "long"],
    "callbacks.early_stopping.min_delta": [-0.1],
    "callbacks.early_stopping.check_on_train_epoch_end": ["always"],
    "callbacks.early_stopping.strict": ["no"],
}
# Key -> why any value is fine. None today: even names and paths have a bad value.
EXEMPT: dict[str, str] = {}
# Keys whose values the machine judges too (validate.py: writable folders, the checkpoint).
MACHINE_KEYS = ("ckpt_path", "paths.root", "paths.output_dir", "callbacks.checkpoint.dirpath")


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every value in a plain YAML mapping that is not itself a mapping."""
    if not isinstance(node, dict) or not node:
        return [prefix]
    keys = []
    for name, child in node.items():
        keys += leaf_keys(child, f"{prefix}.{name}" if prefix else str(name))
    return keys


def conf_keys() -> list[tuple[tuple[str, ...], str]]:
    """(the overrides that select the file, key) for every leaf key that a file of conf/ sets."""
    found = []
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            raw.pop("defaults", None)
            if group == "callbacks":
                option = (f"callbacks=[{','.join(ALL_CALLBACKS)}]",)
            else:
                selected = f"{group}={path.stem}"
                option = (selected, *TO_RUN.get(selected, []))
            found += [(option, f"{group}.{key}") for key in leaf_keys(raw) if raw]
    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    for skip in ("defaults", "hydra"):
        top.pop(skip)
    found += [((), key) for key in leaf_keys(top)]
    return found


CONF_KEYS = conf_keys()
CASES = [
    pytest.param(option, key, bad, id=f"{'+'.join(option) or 'config'}:{key}={bad!r}")
    for option, key in CONF_KEYS
    if key in BAD
    for bad in BAD[key]
]


def test_every_key_has_a_rule():
    keys = {key for _, key in CONF_KEYS}
    missing = sorted(keys - set(BAD) - set(EXEMPT))
    assert not missing, f"keys in conf/ without a bad value in BAD or a reason in EXEMPT: {missing}"
    stale = sorted((set(BAD) | set(EXEMPT)) - keys)
    assert not stale, f"BAD or EXEMPT name keys that conf/ no longer has: {stale}"
    # validate.RULES checks keys of conf/ only (a rule for a key gone from conf/ is dead code).
    assert not sorted(set(RULES) - keys)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """base(option) -> the composed config of that option, which must pass as it is."""
    root = tmp_path_factory.mktemp("rules")
    (root / BLOCKER).write_text("a file: nothing can be made under it")

    @cache
    def compose(option: tuple[str, ...]) -> DictConfig:
        cfg = compose_config([f"paths.root={root / 'outputs'}", *option], root / "run")
        if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            check_values(cfg)  # the values; this machine cannot run the option itself
        else:
            check_config(cfg)
        return cfg

    yield root, compose
    assert sorted(p.name for p in root.iterdir()) == [BLOCKER], "checking wrote something"


def with_value(cfg: DictConfig, key: str, value: Any, root: Path) -> DictConfig:
    bad = copy.deepcopy(cfg)
    if isinstance(value, str) and value.startswith(BLOCKER):
        value = str(root / value)
    OmegaConf.update(bad, key, value, merge=False)
    return bad


def own_node(key: str, cfg: DictConfig) -> str | None:
    """The key of the component node that `key` is an argument of (data, callbacks.console...)."""
    return next((node for node, _ in component_nodes(cfg) if key.startswith(f"{node}.")), None)


def copying_nodes(key: str, cfg: DictConfig) -> list[str]:
    """The component nodes with a value copied from `key` (callbacks.console for print_every)."""
    copies = []
    for node_key, node in component_nodes(cfg):
        raw = str(OmegaConf.to_container(node, resolve=False))
        if re.search(r"\$\{" + re.escape(key) + r"\}", raw):
            copies.append(node_key)
    return copies


def direct_error(node_key: str, cfg: DictConfig) -> Exception | None:
    """What the component says when built directly (not through check_config or Hydra) from
    the node's values: its exception, or None if it takes them."""
    node = OmegaConf.select(cfg, node_key)
    kwargs = OmegaConf.to_container(node, resolve=True)
    component = get_class(kwargs.pop("_target_"))
    try:
        with torch.random.fork_rng(devices=[]):
            component(**kwargs)
    except COMPONENT_ERRORS as error:
        return error
    return None


@pytest.mark.parametrize(("option", "key", "bad"), CASES)
def test_a_bad_value_is_refused_before_training_by_its_owner(base, option, key, bad):
    root, compose = base
    good = compose(option)
    cfg = with_value(good, key, bad, root)
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    message = str(refused.value)
    assert "\n" not in message, message

    node_key = own_node(key, good)
    if node_key and key == f"{node_key}._target_":
        assert message.startswith(f"{key}=") and "cannot be imported" in message, message
        return
    if key in RULES:
        # validate.py's rule, naming the key. A component that copies the value
        # (data.seed: ${seed}) is not asked again: it is reported once, where it was typed.
        assert message.startswith(f"{key}="), message
        if node_key:
            error = direct_error(node_key, cfg)
            assert error is None, f"{key} is checked twice: by RULES and by {node_key}: {error}"
        return
    if key in MACHINE_KEYS and not (node_key and direct_error(node_key, cfg)):
        # A value of the right kind that this machine cannot use (a folder under a file).
        assert message.startswith(f"{key}="), message
        return
    # Otherwise the component's rule: the one the key is an argument of, or that copies it
    # (callbacks.console for print_every), in its own words under its key.
    owners = ([node_key] if node_key else []) + copying_nodes(key, good)
    said = {owner: direct_error(owner, cfg) for owner in owners}
    expected = {
        str(error) if str(error).startswith(f"{owner}.") else f"{owner}: {error}"
        for owner, error in said.items()
        if error is not None
    }
    assert expected, f"who refused {key}={bad!r}? not {owners}, not RULES: {message}"
    assert message in expected, (message, expected)
    assert key.rsplit(".", 1)[-1] in message, message
