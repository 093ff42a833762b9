"""Bad numbers during training: NaN/Inf gradients and a learning rate that diverges are caught by
the monitor's alerts; with `on_nonfinite=stop` training ends at that step, and the run directory
keeps its config, flushed event files and the last good checkpoint."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typing_extensions import override

from gradwatch.monitor import GradientAlert
from gradwatch.train import train

# XOR, one full-batch step per epoch; scalars and a checkpoint every 5 steps (4, 9, 14, ...).
RUN = ["trainer.log_every_n_steps=5", "callbacks.checkpoint.every_n_train_steps=5"]
RUN += ["print_every=0", "callbacks.gradient_monitor.histogram_every_n_steps=0"]


class BadGradients(Callback):
    """Writes `value` into the first element of `param`'s gradient at the given optimizer steps,
    after backward and before any callback reads the gradients. With `repair`, puts the weight
    back after the step (and after the monitor, earlier in the callback list, has read the step),
    so training goes on with finite weights: a transient fault, the way an AMP overflow comes
    and goes.

    Added to a run as `+callbacks.bad_gradients._target_=test_training_faults.BadGradients`.
    """

    def __init__(
        self, steps: list[int], value: float = math.nan, param: str = "fc1.weight", repair=False
    ) -> None:
        self.steps, self.value, self.param, self.repair = set(steps), value, param, repair
        self._kept_weight: float | None = None

    def _param(self, pl_module) -> torch.Tensor:
        return next(p for n, p in pl_module.named_parameters() if n.endswith(self.param))

    @override
    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps:
            param = self._param(pl_module)
            self._kept_weight = param.detach().view(-1)[0].item()
            param.grad.view(-1)[0] = self.value

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.repair and self._kept_weight is not None:
            with torch.no_grad():
                self._param(pl_module).view(-1)[0] = self._kept_weight
            self._kept_weight = None


def with_bad_gradients(steps: list[int], **kwargs) -> list[str]:
    node = "+callbacks.bad_gradients"
    overrides = [f"{node}._target_={__name__}.BadGradients", f"{node}.steps={steps}"]
    return overrides + [f"{node}.{key}={value}" for key, value in kwargs.items()]


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def alert_texts(events: EventAccumulator) -> list[tuple[int, str]]:
    return [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in events.Tensors("alerts/text_summary")
    ]


def scalar(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def fit_catching_alerts(cfg) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        metrics = train(cfg)
    return metrics, [str(w.message) for w in record if issubclass(w.category, GradientAlert)]


def assert_run_files_intact(run_dir: Path) -> tuple[dict, int]:
    """config.yaml, gradients.json, one event file and a last.ckpt of finite weights are there.
    Returns metrics.json and the checkpoint's step."""
    assert OmegaConf.load(run_dir / "config.yaml").callbacks.gradient_monitor.on_nonfinite == "stop"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert json.loads((run_dir / "gradients.json").read_text())["alerts"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for name, weight in checkpoint["state_dict"].items():
        assert weight.isfinite().all(), name
    return json.loads((run_dir / "metrics.json").read_text()), checkpoint["global_step"]


@pytest.mark.parametrize(
    ("step", "value", "message"),
    [
        # On a logging step: read back at once, only the injected layer is named.
        (14, "nan", "non-finite gradients at step 14 in layers: fc1 (1 values)"),
        # Between logging steps: caught on device, reported at the next logging step (14). By
        # then the NaN the Inf made in the weights has reached every layer.
        (12, "inf", "non-finite gradients at step 14, first seen at step 12 in layers: fc1 ("),
    ],
)
def test_nonfinite_gradients_stop_training_and_keep_the_run(make_cfg, step, value, message):
    cfg = make_cfg(
        *RUN,
        "trainer.max_epochs=100",
        "callbacks.gradient_monitor.on_nonfinite=stop",
        *with_bad_gradients([step], value=value),
    )
    run_dir = Path(cfg.paths.output_dir)
    metrics, alerts = fit_catching_alerts(cfg)

    nonfinite = [a for a in alerts if "non-finite" in a]
    assert len(nonfinite) == 1, alerts
    assert message in nonfinite[0]
    assert "stopping training (on_nonfinite='stop') [nonfinite]. Fix: " in nonfinite[0]
    if step == 14:
        assert "fc2" not in nonfinite[0]
    # Stopped after the logging step that saw it, not at max_epochs.
    assert metrics["steps"] == 15

    # The weights went bad at `step`: the checkpoint of step 15 was refused, step 10's is kept.
    saved, checkpoint_step = assert_run_files_intact(run_dir)
    assert checkpoint_step == 10
    assert saved["steps"] == 15 and saved["alerts/nonfinite"] == 1

    # Event files flushed and readable: the counts, the loss up to the stop, the alert text.
    events = read_events(run_dir)
    assert scalar(events, "grad_nonfinite/fc1")[14] >= 1
    assert 9 not in scalar(events, "grad_nonfinite/total")  # written only where a count is not 0
    assert max(scalar(events, "train/loss")) == 14
    assert [s for s, text in alert_texts(events) if "non-finite" in text] == [14]


def test_warn_alerts_once_per_episode_and_trains_on(make_cfg):
    # Logging steps 4, 9, ..., 39. Bad at 9 and 14 (one episode), good at 19 and 24, bad at 29.
    cfg = make_cfg(*RUN, "trainer.max_epochs=40", *with_bad_gradients([9, 14, 29], repair=True))
    run_dir = Path(cfg.paths.output_dir)
    metrics, alerts = fit_catching_alerts(cfg)

    nonfinite = [a for a in alerts if "non-finite" in a]
    assert len(nonfinite) == 2, alerts
    assert "at step 9 in layers: fc1 (1 values)" in nonfinite[0]
    assert "at step 29 in layers: fc1 (1 values)" in nonfinite[1]
    assert "stopping" not in nonfinite[0]
    assert metrics["steps"] == 40 and metrics["alerts/nonfinite"] == 2

    events = read_events(run_dir)
    counts = scalar(events, "grad_nonfinite/total")
    assert [s for s, c in sorted(counts.items()) if c] == [9, 14, 29]
    assert [s for s, text in alert_texts(events) if "non-finite" in text] == [9, 29]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 40


def test_exploding_experiment_is_caught_and_keeps_its_files(tmp_path):
    """`experiment=exploding` from the command line: the exploding alert on the console, in the
    event files and in metrics.json; then the non-finite stop, exit code 0 and every file whole."""
    root = tmp_path / "outputs"
    command = [
        sys.executable,
        "-m",
        "gradwatch.train",
        "experiment=exploding",
        f"paths.root={root}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    # The run ended as configured (stopped by the monitor): not an error.
    assert done.returncode == 0, output
    assert "ALERT GradientMonitor: exploding gradients at step " in output
    assert "ALERT GradientMonitor: non-finite gradients at step " in output
    assert "Traceback" not in output

    (run_dir,) = (root / "exploding").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["alerts/exploding"] == 1 and metrics["alerts/nonfinite"] == 1
    assert metrics["alerts"] >= 2
    assert metrics["steps"] < 100  # stopped early, not at max_epochs

    events = read_events(run_dir)
    texts = alert_texts(events)
    exploding = [s for s, text in texts if text.startswith("**exploding**")]
    stopped = [s for s, text in texts if text.startswith("**nonfinite**")]
    assert len(exploding) == 1 and len(stopped) == 1 and exploding[0] < stopped[0]
    assert "more than 10x its running median" in dict(texts)[exploding[0]]
    assert metrics["steps"] == stopped[0] + 1
    # The loss curve up to the stop is on disk.
    assert max(scalar(events, "train/loss")) == stopped[0]

    # Checkpoints every 5 steps while the weights were finite; none after they overflowed.
    _, checkpoint_step = assert_run_files_intact(run_dir)
    assert 0 < checkpoint_step <= stopped[0] and checkpoint_step % 5 == 0
    assert (run_dir / "grad_flow.png").stat().st_size > 0
