"""What the rules read: one :class:`Observation` per logging step, and the :class:`History` of
them. Plain Python values only, so a test builds a history by hand and a checkpoint stores it."""

import math
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


@dataclass
class History:
    """The logging steps so far, oldest first (the monitor keeps the last ``KEPT``), and the
    first finite loss of the run (what "progress" is measured from)."""

    observations: list[Observation] = field(default_factory=list)
    first_loss: float | None = None

    KEPT = 256

    def __post_init__(self) -> None:
        if self.first_loss is None:
            self.first_loss = next((o.loss for o in self.observations if _finite(o.loss)), None)

    def add(self, obs: Observation) -> None:
        self.observations.append(obs)
        if len(self.observations) > self.KEPT:
            del self.observations[: len(self.observations) - self.KEPT]
        if self.first_loss is None and _finite(obs.loss):
            self.first_loss = obs.loss

    @property
    def last(self) -> Observation:
        return self.observations[-1]

    def losses(self) -> list[float]:
        """The finite losses of the kept steps, oldest first."""
        return [o.loss for o in self.observations if _finite(o.loss)]

    def trailing(self, condition) -> list[Observation]:
        """The newest observations for which ``condition`` holds, up to the first that fails."""
        out = []
        for obs in reversed(self.observations):
            if not condition(obs):
                break
            out.append(obs)
        return out[::-1]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
