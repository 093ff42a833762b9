"""Checks a composed config before anything trains, so a typo costs seconds, not a run.

Hydra itself rejects unknown group options and unknown keys (struct mode); what it cannot know
(types of plain YAML values, ranges, whether the network fits the dataset) is checked here.
"""

from omegaconf import DictConfig

from gradwatch.data import DATASET_INFO
from gradwatch.model import LOSSES


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key, the value and what is allowed."""


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value in `cfg` that cannot run."""
    check_model_fits_data(cfg)


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
