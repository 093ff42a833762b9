"""What the rules read: one :class:`Observation` per logging step, and the :class:`History` of
them. Plain Python values only, so a test builds a history by hand and a checkpoint stores it."""

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Observation:
    """What one logging step measured, on the host.

    Attributes:
        step: the step the values are written at.
        layer_norms: each layer's L2 gradient norm, by its tag (never the name of a total;
            layers without a gradient are absent).
        totals: the whole model's L2 norm under ``"total"``; where several optimizers step on
            different steps, one per optimizer that stepped (``"total_optimizer1"``).
        nonfinite: per layer, how many gradient values are NaN or Inf.
        update_ratios: per layer, the norm of the step's change over the weights' norm.
        loss: the step's training loss, if known; under data parallelism the mean over the
            processes, as ``train/loss`` is logged.
        first_bad_step: with ``on_nonfinite="stop"``, the first step since the last logging step
            whose gradients held NaN or Inf.
        overflow_expected: a GradScaler is in use: Inf gradients with a finite loss are its
            overflow signal (it skips the step and lowers the scale), not the model's problem.
        no_gradient: parameters an optimizer steps whose ``.grad`` is None at this step.
        not_optimized: parameters that have a gradient but are in no optimizer's param groups.
        activations: per layer, statistics of its outputs as the next layer receives them:
            ``units``, and the shares ``dead``, ``saturated`` and ``alike`` (see ``activations``).
        amp_scale: the GradScaler's scale after the step, under fp16 mixed precision.
        weight_norms: per layer, the L2 norm of its weights before the step.
        carried_gradient: the norm of what ``.grad`` held beyond the step's own backward (carried
            over from earlier steps) over the norm of the backward's gradient; None where it is
            not measured (DDP, AMP).
        low_precision: the layers whose weights are 16-bit floats, with their dtype
            (``"bfloat16"``, ``"float16"``): a step below their resolution is rounded away.
        rounded_away: per 16-bit layer, the share of the values its gradient asked to move
            (not exactly 0) that the step left exactly as they were.
        zero_eps: the float16 layers whose optimizer divides by ``sqrt(v) + eps`` (Adam and its
            kin) with an eps that float16 rounds to 0, with that eps.
    """

    step: int
    layer_norms: dict[str, float]
    totals: dict[str, float]
    nonfinite: dict[str, float] = field(default_factory=dict)
    update_ratios: dict[str, float] = field(default_factory=dict)
    loss: float | None = None
    first_bad_step: int | None = None
    overflow_expected: bool = False
    no_gradient: list[str] = field(default_factory=list)
    not_optimized: list[str] = field(default_factory=list)
    activations: dict[str, dict[str, float]] = field(default_factory=dict)
    amp_scale: float | None = None
    weight_norms: dict[str, float] = field(default_factory=dict)
    carried_gradient: float | None = None
    low_precision: dict[str, str] = field(default_factory=dict)
    rounded_away: dict[str, float] = field(default_factory=dict)
    zero_eps: dict[str, float] = field(default_factory=dict)


@dataclass
class History:
    """The logging steps so far, oldest first (the monitor keeps the last ``KEPT``), the first
    finite loss of the run (what "progress" is measured from), and the lowest smoothed loss
    (the best progress made: the median of each ``SMOOTHING`` finite losses in a row).

    Every rule reads a window of the newest steps, so that a logging step costs the same at the
    run's first log and at its ten-thousandth; the lowest smoothed loss is kept as the steps
    come, for the same reason."""

    observations: list[Observation] = field(default_factory=list)
    first_loss: float | None = None
    best_smoothed_loss: float | None = None

    KEPT = 256
    SMOOTHING = 5

    def __post_init__(self) -> None:
        if self.first_loss is None:
            self.first_loss = next((o.loss for o in self.observations if _finite(o.loss)), None)
        if self.best_smoothed_loss is None:
            losses = [o.loss for o in self.observations if _finite(o.loss)]
            self.best_smoothed_loss = min(running_medians(losses), default=None)

    def add(self, obs: Observation) -> None:
        self.observations.append(obs)
        if len(self.observations) > self.KEPT:
            del self.observations[: len(self.observations) - self.KEPT]
        if _finite(obs.loss):
            if self.first_loss is None:
                self.first_loss = obs.loss
            now = self.smoothed_loss()
            best = self.best_smoothed_loss
            self.best_smoothed_loss = now if best is None else min(best, now)

    @property
    def last(self) -> Observation:
        return self.observations[-1]

    def recent_losses(self, n: int) -> list[float]:
        """The newest ``n`` finite losses (fewer if there are not as many), oldest first."""
        out = []
        for obs in reversed(self.observations):
            if len(out) == n:
                break
            if _finite(obs.loss):
                out.append(obs.loss)
        return out[::-1]

    def smoothed_loss(self) -> float | None:
        """The median of the newest ``SMOOTHING`` finite losses (of fewer at the start)."""
        losses = self.recent_losses(self.SMOOTHING)
        return statistics.median(losses) if losses else None

    def recent_values(self, key: str, n: int) -> list[float]:
        """The newest ``n`` values of ``totals[key]`` among the steps that have it, oldest first."""
        out = []
        for obs in reversed(self.observations):
            if len(out) == n:
                break
            if key in obs.totals:
                out.append(obs.totals[key])
        return out[::-1]

    def trailing(self, condition, limit: int | None = None) -> list[Observation]:
        """The newest observations for which ``condition`` holds, up to the first that fails
        (at most ``limit`` of them), oldest first."""
        out = []
        for obs in reversed(self.observations):
            if len(out) == limit or not condition(obs):
                break
            out.append(obs)
        return out[::-1]


def running_medians(losses: list[float]) -> list[float]:
    """Medians of each ``History.SMOOTHING`` losses in a row (of fewer at the start)."""
    n = History.SMOOTHING
    return [statistics.median(losses[max(0, i - n + 1) : i + 1]) for i in range(len(losses))]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
