"""Every bad input is answered before training: exit code, a short message naming the key, the
value and what is allowed, no traceback, and nothing written before is lost.

Values a component checks itself (the datamodule, the model, the callbacks) are reported with the
component's own message, prefixed with its key; tests/test_config_rules.py goes through every
option in conf/.

A few cases run the real command line (a subprocess each, a few seconds of imports); the rest
call `check_config` on configs composed the same way, which takes milliseconds.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config

from gradwatch.preflight import check_config
from gradwatch.validate import ConfigError, writable_problem
from gradwatch.write_errors import describe_write_error

HOOK = "++hydra.callbacks.check_before_run._target_=gradwatch.preflight.CheckBeforeRun"


def run_train(*overrides: str, root: Path, full_error: bool = False):
    """`python -m gradwatch.train <overrides> paths.root=<root>`: (exit code, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.train", *overrides, f"paths.root={root}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def earlier_run(tmp_path: Path) -> Path:
    """A finished run already in the output root, which a failed start must leave as it was."""
    run = tmp_path / "outputs" / "xor" / "2020-01-01_00-00-00_000000_1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"an earlier checkpoint")
    return run


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_short_error(code: int, output: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output


# --- the command line: one case of each kind -----------------------------------------------


def test_unknown_group_option_lists_the_options(tmp_path, earlier_run):
    before = snapshot(earlier_run)
    code, out = run_train("optimizer=adamm", root=tmp_path / "outputs")
    assert_short_error(code, out, 1, "optimizer", "adamm", "adam", "adamw", "rmsprop", "sgd")
    assert len(out.splitlines()) <= 15, out
    assert snapshot(earlier_run) == before


def test_unknown_key_is_rejected(tmp_path, earlier_run):
    before = snapshot(earlier_run)
    code, out = run_train("trainer.max_epoch=10", root=tmp_path / "outputs")
    assert_short_error(code, out, 1, "trainer.max_epoch", "not in struct")
    assert snapshot(earlier_run) == before
    assert sorted(p.name for p in (tmp_path / "outputs" / "xor").iterdir()) == [earlier_run.name]


def test_wrong_types_and_ranges_exit_2_listing_each(tmp_path, earlier_run):
    before = snapshot(earlier_run)
    code, out = run_train(
        "trainer.max_epochs=ten", "optimizer.lr=0", "data.batch_size=big", root=tmp_path / "outputs"
    )
    assert_short_error(
        code,
        out,
        2,
        "Error in config: 3 values cannot run",
        "trainer.max_epochs='ten' is not allowed: expected an integer >= 1",
        "optimizer.lr=0 is not allowed: expected a number > 0",
        "data.batch_size must be an integer >= 1 or null (the whole training set in one batch), "
        "got 'big'",
    )
    assert len(out.splitlines()) <= 5, out
    assert snapshot(earlier_run) == before
    # Nothing trained: no checkpoint, no metrics in the new run directory.
    assert not list((tmp_path / "outputs").rglob("metrics.json"))


def test_full_error_shows_the_traceback(tmp_path):
    code, out = run_train("seed=abc", root=tmp_path / "outputs", full_error=True)
    assert code != 0
    assert "Traceback" in out and "ConfigError" in out and "seed='abc'" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_trainer_without_cuda(tmp_path):
    code, out = run_train("trainer=gpu", root=tmp_path / "outputs")
    assert_short_error(code, out, 2, "trainer.accelerator=gpu", "no CUDA GPU", "trainer=cpu")


def test_unwritable_output_root_is_reported_before_hydra_makes_the_run_dir(tmp_path, earlier_run):
    # Tests run as root, who may write in a chmod 555 folder: nobody can write under a file.
    blocker = tmp_path / "outputs" / "not_a_folder"
    blocker.write_text("a file")
    before = snapshot(tmp_path / "outputs")
    code, out = run_train(HOOK, root=blocker / "runs")
    assert_short_error(
        code, out, 2, f"paths.root={blocker / 'runs'} cannot be written", "is a file, not a folder"
    )
    assert len(out.splitlines()) <= 2, out
    assert snapshot(tmp_path / "outputs") == before


# --- check_config on composed configs ------------------------------------------------------


@pytest.fixture
def check(tmp_path):
    """check(*overrides): check_config on the composed config; the ConfigError text, or None."""

    def run(*overrides: str, output_dir: Path | None = None) -> str | None:
        cfg = compose_config(
            [f"paths.root={tmp_path / 'outputs'}", *overrides], output_dir or tmp_path / "run"
        )
        try:
            check_config(cfg)
        except ConfigError as error:
            return str(error)
        return None

    return run


def test_the_defaults_and_experiments_pass(check):
    assert check() is None
    assert check("experiment=seed_xor") is None
    assert check("experiment=xor_adam") is None


@pytest.mark.parametrize("option", ["adam", "adamw", "rmsprop", "sgd"])
def test_every_optimizer_passes(check, option):
    assert check(f"optimizer={option}") is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=moons"],
        ["data=circles"],
        ["data=spiral", "model.layer_sizes=[2,8,3]", "model.loss=cross_entropy"],
        ["data=sine", "model.layer_sizes=[1,8,1]"],
        ["optimizer.lr=1e-3", "optimizer.momentum=0.9", "data.batch_size=2"],
        ["trainer.max_epochs=1", "print_every=0", "trainer.check_val_every_n_epoch=null"],
        ["callbacks.checkpoint=null", "logger=none"],
        ["trainer.profiler=simple"],
    ],
)
def test_good_values_pass(check, overrides):
    assert check(*overrides) is None


ACTIVATIONS = "['sigmoid', 'tanh', 'relu', 'gelu']"
LOSSES = "['mse', 'bce_with_logits', 'cross_entropy']"
DATASETS = "['xor', 'moons', 'circles', 'spiral', 'sine']"
INT_1 = "an integer >= 1"
SIZES = "model.layer_sizes must be a list of at least two integers >= 1, e.g. [2,2,1], got"
# Keys that no component checks (validate.RULES): (overrides, what the message shows as given,
# what it says is allowed)
BAD_VALUES = [
    # wrong types
    ("seed=abc", "seed='abc'", "an integer in [0, 4294967295]"),
    ("optimizer.lr=fast", "optimizer.lr='fast'", "a number > 0"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5", INT_1),
    ("trainer.max_epochs=true", "trainer.max_epochs=True", INT_1),
    # out of range
    ("seed=-1", "seed=-1", "an integer in [0, 4294967295]"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0", INT_1),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1", INT_1),
    ("optimizer.lr=0", "optimizer.lr=0", "a number > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1", "a number > 0"),
    ("optimizer.momentum=1", "optimizer.momentum=1", "a number in [0, 1)"),
    ("optimizer.momentum=-0.5", "optimizer.momentum=-0.5", "a number in [0, 1)"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1", "a number >= 0"),
    ("optimizer=adam optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9,1.5]", "two numbers in"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0", INT_1),
    # unknown names
    ("trainer.accelerator=tpuu", "trainer.accelerator='tpuu'", "one of ['auto', 'cpu',"),
    ("trainer.profiler=fast", "trainer.profiler='fast'", "one of [None, 'simple', 'advanced',"),
    ("trainer.precision=15", "trainer.precision=15", "one of [64, 32, 16,"),
    ("trainer.strategy=dpp", "trainer.strategy='dpp'", "one of ['auto', 'ddp',"),
    ("optimizer._target_=torch.nn.Linear", "optimizer._target_='torch.nn.Linear'", "the import"),
]


@pytest.mark.parametrize(("overrides", "given", "allowed"), BAD_VALUES)
def test_bad_values_are_named_with_what_is_allowed(check, overrides, given, allowed):
    message = check(*overrides.split())
    assert message is not None and message.startswith(f"{given} is not allowed: expected {allowed}")
    assert len(message.splitlines()) == 1


# Keys a component checks itself: (overrides, the whole message)
COMPONENT_BAD_VALUES = [
    (
        "data.batch_size=0",
        "data.batch_size must be an integer >= 1 or null (the whole training "
        "set in one batch), got 0",
    ),
    ("data.val_fraction=1.0", "data.val_fraction must be a number in [0, 1), got 1.0"),
    ("data.name=mnist", f"data.name must be one of {DATASETS}, got 'mnist'"),
    ("data.n_samples=0", "data.n_samples must be an integer >= 1, got 0"),
    ("model.layer_sizes=5", f"{SIZES} 5"),
    ("model.layer_sizes=[]", f"{SIZES} []"),
    ("model.layer_sizes=[2,0,1]", f"{SIZES} [2, 0, 1]"),
    ("model.layer_sizes=[2,-3,1]", f"{SIZES} [2, -3, 1]"),
    ("model.layer_sizes=[2,2.5,1]", f"{SIZES} [2, 2.5, 1]"),
    ("model.activation=swish", f"model.activation must be one of {ACTIVATIONS}, got 'swish'"),
    ("model.loss=hinge", f"model.loss must be one of {LOSSES}, got 'hinge'"),
    ("print_every=-1", "callbacks.console: print_every must be an integer >= 0 (0: never), got -1"),
    (
        "callbacks.console.progress_bar=sometimes",
        "callbacks.console: progress_bar must be true or false, got 'sometimes'",
    ),
    # Once passed by the old table and refused by RunCheckpoint; a TypeError for null.
    (
        "callbacks.checkpoint.every_n_train_steps=0",
        "callbacks.checkpoint: every_n_train_steps must be an integer >= 1, got 0",
    ),
    (
        "callbacks.checkpoint.every_n_train_steps=null",
        "callbacks.checkpoint: every_n_train_steps must be an integer >= 1, got None",
    ),
    (
        "callbacks=[default,early_stopping] callbacks.early_stopping.mode=lowest",
        "callbacks.early_stopping: `mode` can be min, max, got lowest",
    ),
    (
        "callbacks.checkpoint._target_=gradwatch.nope.Checkpoint",
        "callbacks.checkpoint._target_='gradwatch.nope.Checkpoint' cannot be imported: "
        "ModuleNotFoundError(\"No module named 'gradwatch.nope'\")",
    ),
    (
        "+callbacks.console.colour=red",
        "callbacks.console: ConsoleProgress.__init__() got an unexpected keyword argument 'colour'",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), COMPONENT_BAD_VALUES)
def test_components_name_their_bad_values(check, overrides, expected):
    assert check(*overrides.split()) == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("model.layer_sizes=[3,2,1]", "model.layer_sizes=[3, 2, 1] starts with 3 inputs, but"),
        ("model.layer_sizes=[2,2,2]", "model.layer_sizes=[2, 2, 2] ends with 2 outputs"),
        (
            "data=sine model.layer_sizes=[1,4,1] model.loss=cross_entropy",
            "model.loss=cross_entropy needs class targets, but data=sine is regression",
        ),
        ("data=spiral model.layer_sizes=[2,4,1]", "model.loss=mse fits two classes, but"),
    ],
)
def test_network_and_loss_must_fit_the_dataset(check, overrides, expected):
    message = check(*overrides.split())
    assert message is not None and message.startswith(expected)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            "callbacks.early_stopping.monitor=val/loss",
            "callbacks.early_stopping.monitor=val/loss but data=xor has no validation split",
        ),
        (
            "callbacks.early_stopping.monitor=val/loss data=moons",
            "callbacks.early_stopping.monitor=val/loss is checked after every training epoch, "
            "but validation runs every trainer.check_val_every_n_epoch=50",
        ),
    ],
)
def test_early_stopping_on_a_val_metric_needs_validation_first(check, overrides, expected):
    message = check("callbacks=[default,early_stopping]", *overrides.split())
    assert message is not None and message.startswith(expected)


@pytest.mark.parametrize(
    "overrides",
    [
        "callbacks.early_stopping.check_on_train_epoch_end=false",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.early_stopping.strict=false",
    ],
)
def test_early_stopping_on_a_val_metric_that_validation_gives_passes(check, overrides):
    base = ["callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val/loss"]
    assert check(*base, "data=moons", overrides) is None


def test_every_problem_is_listed_at_once(check):
    message = check("trainer.max_epochs=0", "optimizer.lr=-1", "print_every=-1")
    assert message.splitlines() == [
        "3 values cannot run:",
        "  trainer.max_epochs=0 is not allowed: expected an integer >= 1",
        "  optimizer.lr=-1 is not allowed: expected a number > 0 that float32 holds (<= 3.4e+38)",
        "  callbacks.console: print_every must be an integer >= 0 (0: never), got -1",
    ]


def test_a_copied_value_is_reported_once_where_it_was_typed(check):
    # data.seed is ${seed}: the user typed seed. The datamodule is not asked about it again.
    assert check("seed=abc") == "seed='abc' is not allowed: expected an integer in [0, 4294967295]"
    assert check("data.seed=abc") == "data.seed must be an integer, got 'abc'"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("bins", "0", "bins must be an int >= 1"),
        ("bins", "many", "bins must be an int >= 1"),
        ("log_every_n_steps", "-1", "log_every_n_steps must be an int >= 0"),
        ("histogram_every_n_steps", "-5", "histogram_every_n_steps must be an int >= 0"),
        ("on_nonfinite", "explode", "on_nonfinite must be one of ['warn', 'stop'], got 'explode'"),
        ("exploding_factor", "1", "exploding_factor must be a number > 1"),
    ],
)
def test_gradient_monitor_values_are_checked_by_the_monitor(check, key, value, expected):
    # The monitor's constructor is asked: its message, under the config key of the callback.
    message = check(f"callbacks.gradient_monitor.{key}={value}")
    assert message is not None and message.startswith("callbacks.gradient_monitor: ")
    assert expected in message and len(message.splitlines()) == 1


def test_a_dropped_callback_is_not_checked(check):
    assert check("callbacks.gradient_monitor=null", "callbacks.checkpoint=null") is None


def test_checking_builds_the_components_but_writes_and_draws_nothing(check, tmp_path):
    # The datamodule, the model and every callback are built to ask them: nothing may reach the
    # disk (not even the run directory), and the weights drawn must not move the global RNG.
    state = torch.get_rng_state()
    assert check("callbacks=[default,early_stopping]", "data=moons") is None
    assert torch.equal(torch.get_rng_state(), state)
    assert list(tmp_path.iterdir()) == []


def test_gradient_monitor_cadence_zero_means_never_and_passes(check):
    assert check("callbacks.gradient_monitor.histogram_every_n_steps=0") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_without_cuda_is_named(check):
    message = check("trainer=gpu")
    assert "trainer.accelerator=gpu" in message and "no CUDA GPU" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_with_cuda_passes_and_too_many_devices_do_not(check):
    assert check("trainer=gpu") is None
    message = check("trainer=gpu", f"trainer.devices={torch.cuda.device_count() + 1}")
    assert "trainer.devices=" in message and "CUDA GPU(s)" in message


def test_output_dir_under_a_file_is_named(check, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    message = check(output_dir=tmp_path / "file.txt" / "run")
    assert message == (
        f"paths.output_dir={tmp_path / 'file.txt' / 'run'} cannot be written: "
        f"{tmp_path / 'file.txt'} is a file, not a folder"
    )
    assert (tmp_path / "file.txt").read_text() == "x"


def test_checkpoint_folder_under_a_file_is_named(check, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    message = check(f"callbacks.checkpoint.dirpath={tmp_path / 'file.txt' / 'ckpts'}")
    assert message.startswith("callbacks.checkpoint.dirpath=") and "is a file" in message


def test_writable_problem_probes_and_leaves_nothing(tmp_path):
    assert writable_problem(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_writable_problem_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "cannot write in" in writable_problem(folder / "run")
    finally:
        folder.chmod(0o755)


def test_a_read_only_folder_is_judged_by_the_os_not_the_mode_bits(tmp_path):
    # As root the probe succeeds (root may write there); as anyone else it fails: either way
    # the answer matches what training would meet.
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        can_write = os.access(folder, os.W_OK)
        assert (writable_problem(folder) is None) == can_write
    finally:
        folder.chmod(0o755)


def test_describe_write_error_disk_full_without_checkpoint(tmp_path):
    error = OSError(28, "No space left on device", str(tmp_path / "events.out"))
    message = describe_write_error(error, tmp_path)
    assert message.startswith(f"cannot write {tmp_path / 'events.out'}: No space left on device")
    assert "(the disk is full)" in message and "cannot be resumed" in message
