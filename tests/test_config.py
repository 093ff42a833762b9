"""Every option of every config group composes, and what it names can be built."""

import importlib.util

import pytest
import torch
from conftest import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gradwatch.train import build_trainer, train
from gradwatch.validate import ConfigError


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Experiments whose sweeper comes with an optional extra (pyproject.toml), and its plugin's module:
# they compose only where the extra is installed, and CI's `make test` installs `.[dev]` only.
EXPERIMENT_EXTRAS = {"xor_optuna": ("optuna", "hydra_plugins.hydra_optuna_sweeper")}


def installed(module: str) -> bool:
    """Whether `module` can be imported; find_spec raises when its parent package is absent."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def experiment_options() -> list:
    """Every experiment, those whose extra is not installed skipped, saying which extra."""
    params = []
    for name in options("experiment"):
        extra, module = EXPERIMENT_EXTRAS.get(name, (None, None))
        missing = module is not None and not installed(module)
        reason = f"needs the {extra} extra: .venv/bin/pip install -e '.[{extra}]'"
        params.append(pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason)))
    return params


def test_every_group_has_its_options():
    assert options("optimizer") == ["adam", "adamw", "rmsprop", "sgd"]
    assert options("logger") == ["csv", "mlflow", "none", "tensorboard"]
    assert {"default", "cpu", "gpu", "debug"} <= set(options("trainer"))
    assert {"seed_xor", "xor_adam"} <= set(options("experiment"))
    assert options("data") == ["circles", "moons", "sine", "spiral", "xor"]


def test_defaults_are_the_tutorial(make_cfg):
    cfg = make_cfg()
    assert cfg.data.name == "xor" and cfg.data.batch_size is None
    assert list(cfg.model.layer_sizes) == [2, 2, 1]
    assert (cfg.model.activation, cfg.model.loss) == ("sigmoid", "mse")
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.01
    assert cfg.trainer.max_epochs == 5000 and cfg.print_every == 500


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_options_build_their_optimizer(make_cfg, name):
    cfg = make_cfg(f"optimizer={name}")
    partial = instantiate(cfg.optimizer)
    optimizer = partial([torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer).__name__.lower() == name
    assert optimizer.defaults["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("data"))
def test_data_options_build_their_dataset(make_cfg, name):
    cfg = make_cfg(f"data={name}")
    dm = instantiate(cfg.data)
    assert dm.name == name
    assert dm.train_x.shape[1] == dm.info.num_inputs
    assert len(dm.train_x) == len(dm.train_y) > 0


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_build_a_trainer(make_cfg, tmp_path, name):
    cfg = make_cfg(f"trainer={name}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs CUDA")
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.log_every_n_steps == cfg.trainer.log_every_n_steps


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_build_their_loggers(make_cfg, tmp_path, name):
    if name == "mlflow":
        pytest.importorskip("mlflow")
    trainer = build_trainer(make_cfg(f"logger={name}", f"paths.root={tmp_path}"), tmp_path)
    kinds = [type(lg).__name__ for lg in trainer.loggers]
    expected = {
        "tensorboard": ["TensorBoardLogger"],
        "csv": ["CSVLogger"],
        "mlflow": ["MLFlowLogger"],
        "none": [],
    }
    assert kinds == expected[name]


def test_several_loggers_at_once(make_cfg, tmp_path):
    trainer = build_trainer(make_cfg("logger=[tensorboard,csv]"), tmp_path)
    assert sorted(type(lg).__name__ for lg in trainer.loggers) == ["CSVLogger", "TensorBoardLogger"]


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_build_their_callbacks(make_cfg, tmp_path, name):
    cfg = make_cfg(f"callbacks={name}")
    trainer = build_trainer(cfg, tmp_path)
    built = {type(cb).__name__ for cb in trainer.callbacks}
    for key, node in cfg.callbacks.items():
        if node:
            assert node._target_.rsplit(".", 1)[1] in built, key


def test_callbacks_are_one_file_each_and_early_stopping_is_off_by_default(make_cfg):
    assert options("callbacks") == [
        "checkpoint",
        "console",
        "default",
        "early_stopping",
        "gradient_monitor",
    ]
    cfg = make_cfg()
    assert list(cfg.callbacks) == ["gradient_monitor", "console", "checkpoint"]
    assert cfg.callbacks.gradient_monitor.bins == 64
    assert cfg.callbacks.checkpoint.every_n_train_steps == 1000


def test_a_callback_is_dropped_with_null(make_cfg, tmp_path):
    trainer = build_trainer(make_cfg("callbacks.gradient_monitor=null"), tmp_path)
    built = {type(cb).__name__ for cb in trainer.callbacks}
    assert "GradientMonitor" not in built and {"ConsoleProgress", "RunCheckpoint"} <= built


def test_early_stopping_is_one_override(make_cfg, tmp_path):
    cfg = make_cfg("callbacks=[default,early_stopping]")
    assert list(cfg.callbacks) == ["gradient_monitor", "console", "checkpoint", "early_stopping"]
    stopping = cfg.callbacks.early_stopping
    assert (stopping.monitor, stopping.mode) == ("train/loss", "min")
    built = {type(cb).__name__ for cb in build_trainer(cfg, tmp_path).callbacks}
    assert {"GradientMonitor", "ConsoleProgress", "RunCheckpoint", "EarlyStopping"} <= built


def test_a_bad_early_stopping_mode_is_refused_before_training(make_cfg, tmp_path):
    cfg = make_cfg(
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.mode=lowest",
        f"paths.root={tmp_path / 'outputs'}",
    )
    with pytest.raises(ConfigError, match="^callbacks.early_stopping: `mode` can be min, max"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []


def test_early_stopping_ends_a_solved_run(make_cfg, tmp_path):
    # Adam solves XOR within a few hundred epochs, then train/loss stops improving: `patience`
    # (100) epochs later the run ends, long before its 2000 epochs.
    metrics = train(
        make_cfg(
            "experiment=xor_adam",
            "callbacks=[default,early_stopping]",
            "print_every=0",
            f"paths.root={tmp_path / 'outputs'}",
        )
    )
    assert metrics["train/loss"] < 0.01
    assert metrics["epochs"] < 1500


@pytest.mark.parametrize("name", experiment_options())
def test_experiment_options_compose(make_cfg, name):
    cfg = make_cfg(f"experiment={name}")
    assert cfg.name == name
    # Every experiment must resolve completely (no missing values, no broken interpolation).
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    OmegaConf.to_container(job, resolve=True, throw_on_missing=True)


def test_seed_xor_is_the_tutorial_exactly(make_cfg):
    cfg = make_cfg("experiment=seed_xor")
    assert cfg.data.name == "xor" and list(cfg.model.layer_sizes) == [2, 2, 1]
    assert (cfg.model.activation, cfg.model.loss) == ("sigmoid", "mse")
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.01, 0.0)
    assert (cfg.trainer.max_epochs, cfg.print_every) == (5000, 500)


def test_unknown_key_is_rejected(make_cfg):
    with pytest.raises(Exception, match="foo"):
        make_cfg("foo=1")


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=moons", "model.loss=bce_with_logits"],
        ["data=circles", "model.layer_sizes=[2,8,1]", "data.batch_size=64"],
        ["data=spiral", "model.layer_sizes=[2,16,3]", "model.loss=cross_entropy"],
        ["data=sine", "model.layer_sizes=[1,16,1]", "model.activation=tanh"],
        ["model.activation=relu", "optimizer=rmsprop"],
        ["model.activation=gelu", "optimizer=adamw", "logger=csv"],
    ],
)
def test_every_dataset_activation_and_loss_trains(make_cfg, overrides):
    metrics = train(make_cfg("trainer=debug", *overrides))
    assert metrics["steps"] >= 5
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
