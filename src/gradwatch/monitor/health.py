"""Health rules over the host values of logging steps: plain Python, no torch, no Lightning.

:class:`Health` takes one :class:`Observation` per logging step, keeps the history, and returns
the alerts whose episode starts at that step (an alert prints once per episode, not every step).
Every rule is a method over the observation and the state kept so far, so a test can build a
history by hand. The state is plain Python: it is checkpointed, and loads with torch's safe
``weights_only=True``.
"""

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from gradwatch.monitor.arguments import check_choice, check_int, check_number

# A loss this fraction of its first logged value means training has converged: no vanishing alert.
CONVERGED_LOSS_FRACTION = 1e-6
NONFINITE_POLICIES = ("warn", "stop")


class GradientAlert(UserWarning):
    """The category of the monitor's console alerts: filter them, or turn them into errors."""


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
    """

    step: int
    layer_norms: dict[str, float]
    totals: dict[str, float]
    nonfinite: dict[str, float] = field(default_factory=dict)
    update_ratios: dict[str, float] = field(default_factory=dict)
    loss: float | None = None
    first_bad_step: int | None = None
    overflow_expected: bool = False


@dataclass
class Alert:
    step: int
    kind: str
    layers: list[str]
    message: str


@dataclass
class Thresholds:
    """When the rules fire; the monitor's arguments of the same names (checked there)."""

    vanishing_threshold: float = 1e-7
    vanishing_fraction: float = 1e-3
    vanishing_patience: int = 5
    exploding_factor: float = 10.0
    exploding_window: int = 50
    stall_update_ratio: float = 3e-4
    stall_loss_tol: float = 1e-2
    stall_patience: int = 10
    on_nonfinite: str = "warn"

    def __post_init__(self) -> None:
        check_int("vanishing_patience", self.vanishing_patience, minimum=1)
        check_int("exploding_window", self.exploding_window, minimum=1)
        check_int("stall_patience", self.stall_patience, minimum=2)
        for name in (
            "vanishing_threshold",
            "vanishing_fraction",
            "stall_update_ratio",
            "stall_loss_tol",
        ):
            check_number(name, getattr(self, name), "a number >= 0", lambda v: v >= 0)
        check_number("exploding_factor", self.exploding_factor, "a number > 1", lambda v: v > 1)
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)


class Health:
    """The alert rules and what they remember between logging steps.

    Rules, each once per episode:

    - nonfinite: NaN or Inf gradients (except a GradScaler's overflow), naming the layers.
    - vanishing: a layer's norm below ``vanishing_fraction`` of the median layer's, or below
      ``vanishing_threshold`` while the median is above it, for ``vanishing_patience`` logs in a
      row; never once the loss has converged (a millionth of its first value).
    - exploding: a total above ``exploding_factor`` times its running median.
    - stall: the loss flat (range within ``stall_loss_tol`` of its mean) over ``stall_patience``
      logs while every layer's update ratio is below ``stall_update_ratio``.
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.t = thresholds or Thresholds()
        self.reset()

    def reset(self) -> None:
        self.history: dict[str, Any] = {"step": [], "layers": {}, "totals": {}, "update_ratio": {}}
        self._totals: dict[str, deque[float]] = {}
        self._vanishing_run: dict[str, int] = {}
        self._stall_losses: deque[float] = deque(maxlen=self.t.stall_patience)
        self._first_loss: float | None = None
        self._episodes: dict[str, bool] = {}
        self.alert_counts: dict[str, dict[str, int]] = {}
        self.alerts: list[dict[str, Any]] = []

    def observe(self, obs: Observation) -> list[Alert]:
        """Record one logging step; return the alerts that start at it."""
        self._record(obs)
        found = [self._nonfinite(obs), self._vanishing(obs)]
        found += [self._exploding(obs, key, total) for key, total in obs.totals.items()]
        found.append(self._stall(obs))
        alerts = [a for a in found if a is not None]
        for alert in alerts:
            for layer in alert.layers or ["total"]:
                counts = self.alert_counts.setdefault(layer, {})
                counts[alert.kind] = counts.get(alert.kind, 0) + 1
            self.alerts.append(asdict(alert))
        return alerts

    def nonfinite_now(self) -> bool:
        """Whether the last observation saw real (not a GradScaler's) NaN or Inf gradients."""
        return self._episodes.get("nonfinite", False)

    # --------------------------------------------------------------------------------------
    # The rules
    # --------------------------------------------------------------------------------------

    def _nonfinite(self, obs: Observation) -> Alert | None:
        bad = {lay: int(c) for lay, c in obs.nonfinite.items() if c > 0}
        if bad and obs.overflow_expected and obs.loss is not None and math.isfinite(obs.loss):
            bad = {}
        first_bad = obs.first_bad_step
        if not self._episode("nonfinite", bool(bad) or first_bad is not None):
            return None
        where = ", ".join(f"{lay} ({c} values)" for lay, c in bad.items()) or "none now"
        since = f", first seen at step {first_bad}" if first_bad is not None else ""
        stop = "; stopping training (on_nonfinite='stop')" if self.t.on_nonfinite == "stop" else ""
        return Alert(
            obs.step,
            "nonfinite",
            list(bad),
            f"non-finite gradients at step {obs.step}{since} in layers: {where}{stop}",
        )

    def _vanishing(self, obs: Observation) -> Alert | None:
        # Only relative to the rest of the network: when every layer is tiny together (converged,
        # or a too-small learning rate) that is the stall alert's story, not this one's.
        converged = self._converged(obs.loss)
        finite = [v for v in obs.layer_norms.values() if math.isfinite(v)]
        median = statistics.median(finite) if finite else 0.0
        vanishing = []
        for lay, v in obs.layer_norms.items():
            t = self.t
            low = not converged and (
                v < t.vanishing_fraction * median or v < t.vanishing_threshold <= median
            )
            run = self._vanishing_run.get(lay, 0) + 1 if low and len(finite) > 1 else 0
            self._vanishing_run[lay] = run
            if self._episode(f"vanishing:{lay}", run >= t.vanishing_patience):
                vanishing.append(lay)
        if not vanishing:
            return None
        details = ", ".join(f"{lay} {obs.layer_norms[lay]:.3e}" for lay in vanishing)
        return Alert(
            obs.step,
            "vanishing",
            vanishing,
            f"vanishing gradients at step {obs.step}: {details} against a median layer norm of"
            f" {median:.3e}, for {self.t.vanishing_patience} logged steps in a row",
        )

    def _exploding(self, obs: Observation, key: str, total: float) -> Alert | None:
        window = self._totals.setdefault(key, deque(maxlen=self.t.exploding_window))
        earlier = [t for t in window if math.isfinite(t)]
        median = statistics.median(earlier) if earlier else 0.0
        exploding = (
            math.isfinite(total)
            and len(earlier) >= min(5, self.t.exploding_window)
            and total > self.t.exploding_factor * median > 0
        )
        window.append(total)
        if not self._episode(f"exploding:{key}", exploding):
            return None
        which = "total norm" if key == "total" else f"{key} norm"
        return Alert(
            obs.step,
            "exploding",
            [],
            f"exploding gradients at step {obs.step}: {which} {total:.3e} is more than"
            f" {self.t.exploding_factor:g}x its running median {median:.3e}",
        )

    def _stall(self, obs: Observation) -> Alert | None:
        # A flat, non-zero loss while every layer barely moves.
        ratios, loss = obs.update_ratios, obs.loss
        small = bool(ratios) and max(ratios.values()) < self.t.stall_update_ratio
        if small and loss is not None and math.isfinite(loss):
            self._stall_losses.append(loss)
        else:
            self._stall_losses.clear()
        losses = list(self._stall_losses)
        mean = sum(losses) / len(losses) if losses else 0.0
        stalled = (
            len(losses) >= self.t.stall_patience
            and abs(mean) > 1e-12
            and (max(losses) - min(losses)) <= self.t.stall_loss_tol * abs(mean)
        )
        if not self._episode("stall", stalled):
            return None
        worst = max(ratios, key=ratios.get)
        return Alert(
            obs.step,
            "stall",
            [],
            f"training has stalled at step {obs.step}: the loss has stayed at {mean:.4g} for"
            f" {len(losses)} logged steps while every layer's update ratio is below"
            f" {self.t.stall_update_ratio:g} (largest {ratios[worst]:.2e}, {worst}): the learning"
            " rate looks too small",
        )

    def _converged(self, loss: float | None) -> bool:
        # Adam on XOR ends at a loss of 1e-13 or exactly 0: gradients that small are the goal.
        if self._first_loss is None and loss is not None and math.isfinite(loss):
            self._first_loss = loss
        return (
            loss is not None
            and self._first_loss is not None
            and abs(loss) <= CONVERGED_LOSS_FRACTION * abs(self._first_loss)
        )

    def _episode(self, key: str, active: bool) -> bool:
        """True when an episode of ``key`` starts."""
        was = self._episodes.get(key, False)
        self._episodes[key] = active
        return active and not was

    # --------------------------------------------------------------------------------------
    # History, summary, checkpoint
    # --------------------------------------------------------------------------------------

    def _record(self, obs: Observation) -> None:
        history = self.history
        n_before = len(history["step"])
        history["step"].append(obs.step)
        # A layer or total first seen late (a second optimizer, unfrozen weights) is padded with
        # NaN before, and one missing at a step (a total of an optimizer that did not step) gets
        # NaN there: every series has one value per step.
        for series, values in (("layers", obs.layer_norms), ("totals", obs.totals)):
            for name, v in values.items():
                history[series].setdefault(name, [math.nan] * n_before).append(v)
            for kept in history[series].values():
                if len(kept) == n_before:
                    kept.append(math.nan)
        history["update_ratio"].update(obs.update_ratios)

    def summary(self) -> dict[str, Any]:
        """Per layer and total: first, last, min and max gradient norm, the last update ratio and
        the alert counts (``gradients.json``), with every alert."""
        history = self.history
        rows = {}
        ratios = history["update_ratio"]
        series = [(lay, ratios.get(lay), v) for lay, v in history["layers"].items()]
        series += [(key, None, v) for key, v in history["totals"].items()]
        for lay, ratio, values in series:
            finite = [v for v in values if math.isfinite(v)]
            rows[lay] = {
                "first": _json_float(values[0]) if values else None,
                "last": _json_float(values[-1]) if values else None,
                "min": min(finite) if finite else None,
                "max": max(finite) if finite else None,
                "last_update_ratio": _json_float(ratio),
                "alerts": dict(self.alert_counts.get(lay, {})),
            }
        return {"steps": list(history["step"]), "layers": rows, "alerts": list(self.alerts)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "totals": {k: list(v) for k, v in self._totals.items()},
            "vanishing_run": dict(self._vanishing_run),
            "stall_losses": list(self._stall_losses),
            "first_loss": self._first_loss,
            "episodes": dict(self._episodes),
            "alert_counts": {k: dict(v) for k, v in self.alert_counts.items()},
            "alerts": list(self.alerts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        history = dict(state["history"])
        totals = state["totals"]
        if "total" in history:  # a checkpoint of gradwatch 0.1: one total series and window
            history["totals"] = {"total": history.pop("total")}
            totals = {"total": totals}
            state = {**state, "episodes": _renamed_episodes(state["episodes"])}
        self.history = history
        for key, values in totals.items():
            self._totals[key] = deque(values, maxlen=self.t.exploding_window)
        self._vanishing_run = dict(state["vanishing_run"])
        self._stall_losses.extend(state["stall_losses"])
        self._first_loss = state.get("first_loss")
        self._episodes = dict(state["episodes"])
        self.alert_counts = {k: dict(v) for k, v in state["alert_counts"].items()}
        self.alerts = list(state["alerts"])


def format_table(summary: dict[str, Any]) -> str:
    """The per-layer summary as the console prints it at the end of training."""
    head = f"{'layer':<24}{'first':>12}{'last':>12}{'min':>12}{'max':>12}{'upd ratio':>12}  alerts"
    lines = ["Gradient norms (L2) per layer:", head]

    def fmt(v: Any) -> str:
        return f"{v:12.3e}" if isinstance(v, float) else f"{'-' if v is None else v!s:>12}"

    for lay, row in summary["layers"].items():
        alerts = ", ".join(f"{k} x{c}" for k, c in row["alerts"].items()) or "-"
        lines.append(
            f"{lay:<24}{fmt(row['first'])}{fmt(row['last'])}{fmt(row['min'])}"
            f"{fmt(row['max'])}{fmt(row['last_update_ratio'])}  {alerts}"
        )
    return "\n".join(lines)


def _renamed_episodes(episodes: dict[str, bool]) -> dict[str, bool]:
    return {("exploding:total" if k == "exploding" else k): v for k, v in episodes.items()}


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)  # JSON has no NaN or Infinity
