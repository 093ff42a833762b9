"""Spikes: a total gradient norm or a loss far above its recent values, at the step it happens.

A step's value is a spike when, against the ``window`` steps before it, its log is

- more than ``sigma`` robust standard deviations above their median (the robust z-score: the
  standard deviation estimated as 1.4826 times the median absolute deviation, so that one spike
  in the window does not inflate the spread and hide the next, as a mean and standard deviation
  would), and
- at least ``log(factor)`` above it (the value at least ``factor`` times the median): a floor for
  windows that barely vary (a loss on a plateau moves by 1e-7, and a move of 1e-6 would be many
  deviations), and
- sudden: at least ``sqrt(factor)`` times the step before. Full-batch training moves smoothly,
  and a deep ReLU network's full-batch gradient norm can climb fifty-fold over thirty healthy
  steps and fall back (the zoo's "vanishing fixed" case, at the edge of stability: at most 1.6
  times from one step to the next); a spike is one step's doing.

Logs, because both quantities change by factors: a minibatch's loss or gradient norm is often
several times another's in a healthy run, and a spike is a factor of tens or hundreds. A loss at
or below zero (a log-likelihood, say) is not checked. Non-finite values are no spikes (the
``nonfinite`` alert says what they are) and take no part in later windows. A value is checked once
its window holds at least ``window // 2`` values. OLMo-core flags a loss 6 sigma over a 128-step
window, with a mean and a standard deviation; those are the defaults here, with the floor.

:func:`check` scores many steps at once, from the values before them: once per logging interval
on the host for ``on_spike="warn"``, and every step on the device for ``on_spike="skip"``, which
must know before the optimizer steps.
"""

import bisect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch.monitor.alerts import Alert

# The quantities checked, in the order of the rows of every tensor here.
QUANTITIES = ("grad_norm", "loss")
# The median absolute deviation of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class SpikeRule:
    window: int = 128
    sigma: float = 6.0
    factor: float = 5.0


def prepared(grad_norms: Tensor, losses: Tensor) -> Tensor:
    """The values :func:`check` compares, as rows ``QUANTITIES``: the logs of the total gradient
    norms and of the losses (float64, NaN where a value is not finite, not positive or none)."""
    values = torch.log(torch.stack([grad_norms, losses]).to(torch.float64))
    return torch.where(values.isfinite(), values, math.nan)


def check(before: Tensor, values: Tensor, rule: SpikeRule) -> tuple[Tensor, Tensor, Tensor]:
    """Scores ``values`` (``[rows, k]``, from :func:`prepared`), each step against the ``window``
    values before it: the last of ``before`` (``[rows, n]``, earlier steps) and the steps of
    ``values`` before it. Returns the spike flags, the robust z-scores and the windows' medians,
    each ``[rows, k]``, on the values' device; no host sync. On the host, where no step is
    sudden (a healthy run's usual interval), the medians are not taken: z-scores and medians are
    NaN."""
    windows = _windows(before, values, rule.window)
    previous = windows[:, :, -1]
    sudden = (values - previous > 0.5 * math.log(rule.factor)) | previous.isnan()
    sudden &= values.isfinite()
    if values.device.type == "cpu" and not sudden.any():
        unknown = torch.full_like(values, math.nan)
        return torch.zeros_like(sudden), unknown, unknown
    median = _median(windows)
    spread = _median((windows - median.unsqueeze(2)).abs()) * MAD_TO_SIGMA
    enough = windows.isfinite().sum(dim=2) >= max(rule.window // 2, 1)
    jump = values - median
    z = jump / spread
    spikes = sudden & enough & (jump > rule.sigma * spread) & (jump > math.log(rule.factor))
    return spikes, z, median


def kept(before: Tensor, values: Tensor, rule: SpikeRule) -> Tensor:
    """The values later checks compare against: the last ``window`` of ``before`` and ``values``."""
    return torch.cat([before, values], dim=1)[:, -rule.window :]


class SpikeWatch:
    """The spike checks of a run: the values before (for the next window), the alerts, the
    skipped steps. Its state is plain Python (checkpointed with the monitor's).

    Args:
        rule: the window, sigma and factor.
        skip: ``on_spike="skip"``: :meth:`should_skip` is asked before every optimizer step.
    """

    def __init__(self, rule: SpikeRule, skip: bool) -> None:
        self.rule = rule
        self.skip = skip
        self.before = torch.empty(2, 0, dtype=torch.float64)
        self.skipped: list[int] = []  # the steps skipped, in order
        self._skip_before: dict[int, Tensor] = {}  # per optimizer: log norms, on the device
        self._last_flagged: dict[str, int] = {}  # per quantity: for episodes of adjacent steps

    def should_skip(self, step: int, optimizer_index: int, total_norm: Tensor) -> bool:
        """Whether the step's total gradient norm (a 1-element tensor on the device) is a spike,
        from this optimizer's earlier steps: one host read of one flag."""
        value = prepared(total_norm.reshape(1), total_norm.new_full((1,), math.nan))[:1]
        before = self._skip_before.get(optimizer_index, value[:, :0])
        flags, _, _ = check(before, value, self.rule)
        self._skip_before[optimizer_index] = kept(before, value, self.rule)
        if bool(flags):  # the read
            self.skipped.append(step)
            return True
        return False

    def observe(
        self, steps: list[int], grad_norms: list[float], losses: list[float | None]
    ) -> tuple[dict[int, dict[str, float]], list[Alert]]:
        """Checks the steps since the last call, in order, each against the ``window`` steps
        before it. Returns the robust z-scores of the spikes by step and quantity (the tags
        ``spike/<quantity>``) and the alerts: one per run of adjacent spike steps. Under
        ``skip``, the gradient norm's spikes are the steps :meth:`should_skip` skipped."""
        if not steps:
            return {}, []
        rows = [[_log(v) for v in grad_norms], [_log(v) for v in losses]]
        values = torch.tensor(rows, dtype=torch.float64)
        if not (self.skip or self._any_sudden(rows)):  # a healthy interval: no tensor work
            self.before = kept(self.before, values, self.rule)
            return {}, []
        flags, z, median = check(self.before, values, self.rule)
        self.before = kept(self.before, values, self.rule)
        if self.skip:
            skipped = set(self.skipped[-len(steps) :])
            flags[0] = torch.tensor([s in skipped for s in steps])
        found: dict[int, dict[str, float]] = {}
        alerts = []
        for row, col in flags.nonzero().tolist():
            quantity, step = QUANTITIES[row], steps[col]
            score = float(z[row, col])
            found.setdefault(step, {})[quantity] = score
            adjacent = self._last_flagged.get(quantity) == step - 1
            self._last_flagged[quantity] = step
            if not adjacent:
                raw = grad_norms[col] if row == 0 else losses[col]
                typical = math.exp(float(median[row, col]))
                alerts.append(self._alert(step, quantity, raw, typical, score))
        return found, alerts

    def _any_sudden(self, rows: list[list[float]]) -> bool:
        """Whether any value is sudden (:func:`check`'s first condition), in plain Python: fifty
        steps' comparisons cost less than the tensors that would make them."""
        rise = 0.5 * math.log(self.rule.factor)
        for row, last in zip(rows, self.before[:, -1:].tolist(), strict=True):
            previous = last[0] if last else math.nan
            for value in row:
                if value == value and (previous != previous or value - previous > rise):
                    return True
                previous = value
        return False

    def tags(self, step: int, found: dict[int, dict[str, float]]) -> dict[str, float]:
        """``spike/<quantity>`` (the robust z-score) at a spike's step; under ``skip``, at each
        step that skipped, how many were skipped up to it."""
        out = {f"spike/{quantity}": z for quantity, z in found.get(step, {}).items()}
        if self.skip and "spike/grad_norm" in out:
            out["spike/skipped_steps"] = float(bisect.bisect_right(self.skipped, step))
        return out

    def _alert(self, step: int, quantity: str, value: float, typical: float, z: float) -> Alert:
        what = "total gradient norm" if quantity == "grad_norm" else "loss"
        skipped = quantity == "grad_norm" and self.skip
        message = (
            f"the {what} spiked to {value:.3g} at step {step}, against a median of {typical:.3g}"
            f" over the {self.rule.window} steps before (robust z {z:.3g})"
            + ("; the optimizer step was skipped" if skipped else "")
        )
        fix = (
            "look at that step's batch (outliers, mislabelled or badly scaled samples) and at"
            " any change of the learning rate there; if spikes recur, clip gradients"
            " (trainer.gradient_clip_val) or skip such steps (on_spike=skip)"
        )
        evidence = {
            "quantity": quantity,
            "value": value,
            "window_median": typical,
            "robust_z": z,
            "window": self.rule.window,
            "skipped": skipped,
        }
        return Alert(step, "spike", [], message, evidence, fix)

    def state_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.tolist(),
            "skipped": list(self.skipped),
            "last_flagged": dict(self._last_flagged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = torch.tensor(state["before"], dtype=torch.float64).reshape(2, -1)
        self.skipped = [int(s) for s in state["skipped"]]
        self._last_flagged = dict(state["last_flagged"])


def _log(value: float | None) -> float:
    """:func:`prepared`'s value on the host: the log, NaN where there is none."""
    if value is None or not 0 < value < math.inf:
        return math.nan
    return math.log(value)


def _median(windows: Tensor) -> Tensor:
    """The lower median over the last dimension, NaN left out (``nanmedian``), in half the time
    where there is no NaN to leave out (asked on the host only: on a device, it would sync)."""
    if windows.device.type == "cpu" and not windows.isnan().any():
        return windows.kthvalue((windows.shape[-1] + 1) // 2, dim=-1).values
    return windows.nanmedian(dim=-1).values


def _windows(before: Tensor, values: Tensor, window: int) -> Tensor:
    """``[rows, k, window]``: for each of the ``k`` values, the ``window`` values before it (the
    end of ``before``, then the earlier ``values``), NaN where the run is shorter."""
    rows, k = values.shape
    padding = values.new_full((rows, window), math.nan)
    series = torch.cat([padding, before[:, -window:], values], dim=1)
    start = series.shape[1] - k - window  # where the first value's window starts
    return series.unfold(1, window, 1)[:, start : start + k]
