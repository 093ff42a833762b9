"""every_step: every step's gradient norms, equal step for step to what the monitor writes at
``log_every_n_steps=1``; spikes of the gradient norm and of the loss caught at their step,
skipped on request, and never flagged on the zoo's healthy runs."""

import math
import signal
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from test_monitor import (
    Module,
    Recorder,
    TwoOptimizers,
    fit,
    read_events,
    scalars,
    xor_loader,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.data import InMemoryDataModule
from gradwatch.model import MLPModule
from gradwatch.monitor import GradientAlert, GradientMonitor
from gradwatch.monitor.spikes import SpikeRule, check, prepared
from gradwatch.zoo.cases import CASES
from gradwatch.zoo.run import run_case

EVERY = 5  # the logging cadence of the every_step runs
STEPS = 23  # not a multiple of EVERY: the last steps are written at the end of training

# What every_step writes at every step: the gradient norm families and their log10 copies.
EVERY_STEP_FAMILIES = ("grad_norm/", "grad_norm_inf/", "grad_norm_1/", "grad_norm_log10/")


def minibatches(batch_size=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, :1] * x[:, 1:] > 0).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def adam_fused(p):
    return torch.optim.Adam(p, lr=1e-3, fused=True)


CASES_OF_TRUTH = {
    "plain, three norm types": ({}, {}, {}),
    "clipped": ({}, {"gradient_clip_val": 0.05}, {}),
    "accumulated over 2 batches": ({}, {"accumulate_grad_batches": 2}, {"minibatches": True}),
    "bf16": ({}, {"precision": "bf16-mixed"}, {}),
    "two optimizers": ({}, {}, {"module": TwoOptimizers}),
    "fp16, fused Adam": ({}, {"fp16": True}, {"module": lambda: Module(optimizer=adam_fused)}),
}


def truth_fit(tmp_path, monitor, trainer_kwargs, how, epochs, every):
    kwargs = dict(trainer_kwargs)
    if kwargs.pop("fp16", False):
        scaler = torch.amp.GradScaler("cpu", growth_interval=3)  # the scale changes mid-run
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    loader = minibatches() if how.get("minibatches") else xor_loader()
    trainer, _ = fit(
        tmp_path,
        monitor,
        module=how.get("module"),
        loader=loader,
        max_epochs=epochs,
        log_every_n_steps=every,
        **kwargs,
    )
    return scalars(read_events(trainer.logger.log_dir))


@pytest.mark.parametrize("case", list(CASES_OF_TRUTH))
def test_every_step_equals_the_monitor_at_log_every_1(tmp_path, case):
    """The same training twice: the monitor writing every step (log_every_n_steps=1) and
    every_step=True at a cadence of 5. Every gradient-norm tag has the same steps and the very
    same values (the same float32 norms, the same host arithmetic)."""
    _, trainer_kwargs, how = CASES_OF_TRUTH[case]
    norm_types = (2, "inf", 1)
    steps_per_epoch = 4 if how.get("minibatches") else 1
    epochs = math.ceil(STEPS / steps_per_epoch)
    every_1 = truth_fit(
        tmp_path / "every_1", GradientMonitor(norm_types=norm_types), trainer_kwargs, how, epochs, 1
    )
    every_step = truth_fit(
        tmp_path / "every_step",
        GradientMonitor(norm_types=norm_types, every_step=True),
        trainer_kwargs,
        how,
        epochs,
        EVERY,
    )
    tags = [t for t in every_1 if t.startswith(EVERY_STEP_FAMILIES)]
    assert "grad_norm/total" in tags and "grad_norm_log10/fc1" in tags
    if "gradient_clip_val" in trainer_kwargs:
        assert "grad_norm/total_clipped" in tags
    n_steps = len(every_1["grad_norm/fc1.weight"])
    assert n_steps >= STEPS
    for tag in tags:
        assert every_step.get(tag) == every_1[tag], tag
    # The rest stays at the cadence of 5: the steps that end a window of 5, and the last step.
    weight_steps = sorted(every_step["weight_norm/fc1.weight"])
    assert weight_steps == [s for s in range(n_steps) if (s + 1) % EVERY == 0]


def test_every_step_is_off_by_default_and_writes_nothing_between_logging_steps(tmp_path):
    values = truth_fit(tmp_path, GradientMonitor(), {}, {}, epochs=10, every=5)
    assert sorted(values["grad_norm/total"]) == [4, 9]


def test_the_device_buffer_is_read_in_one_transfer_per_logging_step(tmp_path, monkeypatch):
    """Between logging steps nothing comes to the host: the only .tolist() calls are the
    logging steps' (one each) and the end of training's (for the steps after the last one)."""
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(self.numel())
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    truth_fit(tmp_path, GradientMonitor(every_step=True, on_spike="off"), {}, {}, 13, 5)
    assert len(calls) == 3  # steps 4 and 9, and the end of training (10, 11, 12)


def test_on_spike_skip_needs_every_step():
    with pytest.raises(ValueError, match="on_spike='skip' needs every_step=true"):
        GradientMonitor(on_spike="skip")
    with pytest.raises(ValueError, match=r"on_spike must be one of \['warn', 'skip', 'off'\]"):
        GradientMonitor(every_step=True, on_spike="ignore")


# ----------------------------------------------------------------------------------------------
# The spike rule, by hand
# ----------------------------------------------------------------------------------------------


def test_the_rule_flags_a_jump_of_many_robust_deviations_and_at_least_factor_times_the_median():
    rule = SpikeRule(window=8, sigma=6.0, factor=5.0)
    grad = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, 100.0, 1.0])
    loss = torch.tensor([1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 10.0])
    flags, z, median = check(torch.empty(2, 0, dtype=torch.float64), prepared(grad, loss), rule)
    assert flags.nonzero().tolist() == [[0, 8], [1, 9]]
    # By hand: the window of step 8 is its 8 values before; log space for the gradient norm.
    window = torch.log(grad[:8].double())
    med = window.median()  # torch's lower median of an even count, as nanmedian's
    mad = (window - med).abs().median() * 1.4826
    assert z[0, 8].item() == pytest.approx(((math.log(100.0) - med) / mad).item())
    assert math.exp(median[0, 8].item()) == pytest.approx(1.0)


def test_a_plateau_that_barely_moves_is_no_spike():
    """A loss sitting at 0.25 that moves by 1e-7 has a deviation of ~1e-7: a rise of 1e-5 is
    100 deviations, but not 5 times the median; nor is a tripling of a smooth series."""
    rule = SpikeRule(window=8)
    loss = torch.full((12,), 0.25) + torch.arange(12) * 1e-7
    loss[10] = 0.25001
    grad = torch.full((12,), 0.1) + torch.arange(12) * 1e-4
    grad[10] = 0.3
    flags, z, _ = check(torch.empty(2, 0, dtype=torch.float64), prepared(grad, loss), rule)
    assert z[0, 10] > 100 and z[1, 10] > 6
    assert not flags.any()


def test_too_few_values_nonfinite_values_and_falls_are_no_spikes():
    rule = SpikeRule(window=8)
    nothing = torch.empty(2, 0, dtype=torch.float64)
    early = torch.tensor([1.0, 1.0, 1.0, 100.0])  # 3 values before: under window // 2
    assert not check(nothing, prepared(early, early), rule)[0].any()
    values = torch.tensor([1.0] * 8 + [math.inf, math.nan, 0.001])
    assert not check(nothing, prepared(values, values), rule)[0].any()


# ----------------------------------------------------------------------------------------------
# Injected spikes, end to end
# ----------------------------------------------------------------------------------------------

SPIKE_AT = 150
SPIKE_STEPS = 200


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Injected(Module):
    """Regression on minibatches, with one bad step: the batch (inputs and targets) scaled by
    100, or the learning rate times 100 for one step."""

    def __init__(self, inject: str, optimizer=None) -> None:
        super().__init__(net=Regression(), optimizer=optimizer)
        self.inject = inject

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.inject == "batch" and self.global_step == SPIKE_AT:
            x, y = x * 100, y * 100
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if self.inject == "lr":
            lr = 0.05 * (100 if self.global_step == SPIKE_AT else 1)
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = lr


def regression_batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 2, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:] + 0.1 * torch.randn(4096, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def spike_fit(tmp_path, inject, on_spike="warn", optimizer=None, extra_callbacks=()):
    monitor = GradientMonitor(every_step=True, on_spike=on_spike, log_every_n_steps=50)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, module = fit(
            tmp_path,
            monitor,
            module=lambda: Injected(inject, optimizer),
            loader=regression_batches(),
            max_steps=SPIKE_STEPS,
            max_epochs=-1,
            log_every_n_steps=50,
            extra_callbacks=extra_callbacks,
        )
    alerts = [w.message for w in record if isinstance(w.message, GradientAlert)]
    spikes = [a for a in alerts if a.kind == "spike"]
    return trainer, module, monitor, spikes


@pytest.mark.parametrize(
    ("inject", "grad_step", "loss_step"), [("batch", 150, 150), ("lr", 151, 151)]
)
def test_injected_spikes_are_caught_at_their_step(tmp_path, inject, grad_step, loss_step):
    """A batch scaled by 100 spikes the gradient norm and the loss at its own step; a learning
    rate times 100 for one step gives a normal gradient at that step and a spike of both at the
    next (the first step taken from the damaged weights): the gradient norm leads the loss by 0
    steps in both. One alert per quantity: the steps after, while the damage lasts, are flagged
    (spike/grad_norm) in the same episode, and nothing else is."""
    trainer, _, monitor, spikes = spike_fit(tmp_path, inject)
    assert [(a.step, a.evidence["quantity"]) for a in spikes] == [
        (grad_step, "grad_norm"),
        (loss_step, "loss"),
    ]
    values = scalars(read_events(trainer.logger.log_dir))
    for quantity, step in (("grad_norm", grad_step), ("loss", loss_step)):
        flagged = sorted(values[f"spike/{quantity}"])
        assert flagged == list(range(step, step + len(flagged)))
        assert values[f"spike/{quantity}"][step] > 6
    # The alert is in gradients.json's list, with its evidence.
    kept = [a for a in monitor.summary()["alerts"] if a["kind"] == "spike"]
    assert {a["step"] for a in kept} == {a.step for a in spikes}
    grad = next(a for a in spikes if a.evidence["quantity"] == "grad_norm")
    norm = values["grad_norm/total"][grad.step]
    assert grad.evidence["value"] == pytest.approx(norm, rel=1e-6)  # TensorBoard keeps float32
    assert grad.evidence["value"] > 2 * grad.evidence["window_median"]


def test_on_spike_skip_does_not_step_on_the_spike(tmp_path):
    """The scaled batch's step is skipped: the weights after it are the weights before, Adam's
    step count is one short, and spike/skipped_steps counts it; every other step moves them."""
    recorder = Recorder()
    trainer, module, _, spikes = spike_fit(
        tmp_path,
        "batch",
        on_spike="skip",
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        extra_callbacks=[recorder],
    )
    w = recorder.weights
    for k in range(SPIKE_STEPS):
        same = all(torch.equal(w[k][n], w[k + 1][n]) for n in w[k])
        assert same == (k == SPIKE_AT), k
    opt = trainer.optimizers[0]
    assert all(opt.state[p]["step"].item() == SPIKE_STEPS - 1 for p in module.parameters())
    values = scalars(read_events(trainer.logger.log_dir))
    assert values["spike/skipped_steps"] == {SPIKE_AT: 1.0}
    grad = next(a for a in spikes if a.evidence["quantity"] == "grad_norm")
    assert grad.step == SPIKE_AT and grad.evidence["skipped"] and "skipped" in str(grad)


HEALTHY = [
    pytest.param(c, id=c.name, marks=() if c.fast else pytest.mark.slow)
    for c in CASES
    if c.expected is None
]


@pytest.mark.parametrize("case", HEALTHY)
def test_no_spike_on_the_healthy_runs_of_the_zoo(case):
    result = run_case(case, monitor_kwargs={"every_step": True})
    assert not result.error
    assert [a for a in result.alerts if a["kind"] == "spike"] == []


def test_a_resumed_run_keeps_the_spike_window(tmp_path):
    """The window of values before is in the monitor's state: a run resumed from a checkpoint
    checks its first steps against the steps before the checkpoint."""
    monitor = GradientMonitor(every_step=True)
    fit(tmp_path, monitor, max_epochs=12, log_every_n_steps=5)
    state = monitor.state_dict()
    assert len(state["spikes"]["before"][0]) == 12
    restored = GradientMonitor(every_step=True)
    restored.load_state_dict(state)
    assert torch.equal(restored._spikes.before, monitor._spikes.before)


def test_a_run_stopped_between_logging_steps_and_resumed_has_every_step_once(tmp_path):
    """Ctrl-C during step 12 (the cadence is 5): the checkpoint saved at the stop writes the
    steps since the last logging step with it, and the run resumed from it continues the same
    curves: every step's gradient norm exactly once, equal to an uninterrupted run's."""
    from gradwatch.checkpoints import RunCheckpoint

    def trainer_for(root, extra=()):
        checkpoint = RunCheckpoint(root / "checkpoints", every_n_train_steps=1000)
        return checkpoint, pl.Trainer(
            max_epochs=30,
            log_every_n_steps=5,
            callbacks=[GradientMonitor(every_step=True), checkpoint, *extra],
            logger=TensorBoardLogger(root, name="", version=""),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=root,
        )

    class CtrlCAtStep12(pl.Callback):
        def __init__(self, checkpoint):
            self.checkpoint = checkpoint

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 12:
                self.checkpoint.stop_signal = signal.SIGINT

    checkpoint, trainer = trainer_for(tmp_path / "stopped")
    trainer.callbacks.append(CtrlCAtStep12(checkpoint))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        torch.manual_seed(0)
        with pytest.raises(SystemExit):
            trainer.fit(MLPModule(), datamodule=InMemoryDataModule("xor"))
    finally:
        signal.signal(signal.SIGINT, sigint)
    stopped = scalars(read_events(tmp_path / "stopped"))["grad_norm/total"]
    assert sorted(stopped) == list(range(13))
    _, resumed = trainer_for(tmp_path / "stopped")
    resumed.fit(MLPModule(), datamodule=InMemoryDataModule("xor"), ckpt_path=checkpoint.last_path)
    torch.manual_seed(0)
    _, whole = trainer_for(tmp_path / "whole")
    whole.fit(MLPModule(), datamodule=InMemoryDataModule("xor"))
    events = read_events(tmp_path / "stopped")
    steps = [e.step for e in events.Scalars("grad_norm/total")]
    assert steps == list(range(30))
    assert (
        scalars(events)["grad_norm/total"]
        == scalars(read_events(tmp_path / "whole"))["grad_norm/total"]
    )
