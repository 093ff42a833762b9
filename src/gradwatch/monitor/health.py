"""The monitor's health: the diagnosis rules run over the run's history, once per episode.

:class:`Health` takes one :class:`Observation` per logging step, adds it to the
:class:`History` the rules read (``rules.py``: plain functions, each tested from a history built
by hand), and returns the :class:`Alert` of every episode that starts at that step: an alert
prints once per episode (per layer, where a rule names layers), not every step. A cause wins over
its symptom: a stall while layers vanish, die or saturate is reported as what causes it, never as
a learning rate too small. It also keeps the per-layer series that ``grad_flow.png`` draws and
``gradients.json`` sums up. Its state is plain Python: it is checkpointed, and loads with torch's
safe ``weights_only=True``.
"""

import math
from dataclasses import asdict
from typing import Any

from gradwatch.monitor import rules
from gradwatch.monitor.alerts import Alert, GradientAlert
from gradwatch.monitor.history import History, Observation
from gradwatch.monitor.rules import Finding, Thresholds

__all__ = ["Alert", "GradientAlert", "Health", "Observation", "Thresholds", "format_table"]

# A kind is not reported once one of these has been: they explain it. A stall (flat loss, tiny
# steps) is what vanishing, dead, saturated or symmetric units look like from the loss; vanishing
# gradients are what dead or saturated units do to the layers below them; a loss that rises after
# the gradients explode is the explosion's doing; a loss that learns nothing for any of these
# reasons is no sign of targets without signal.
EXPLAINED_BY = {
    "stall": {
        "vanishing",
        "dead_units",
        "saturated_units",
        "symmetric_units",
        "accumulating",
        "no_update",
    },
    "no_update": {"vanishing", "skipped_steps", "nonfinite", "not_optimized"},
    "vanishing": {"dead_units", "saturated_units", "symmetric_units"},
    "diverging": {"exploding", "accumulating", "nonfinite"},
    "exploding": {"accumulating"},
    "accumulating": {"nonfinite"},
    "dead_units": {"diverging"},
    "saturated_units": {"diverging"},
    "no_signal": {
        "vanishing",
        "dead_units",
        "saturated_units",
        "symmetric_units",
        "stall",
        "diverging",
        "exploding",
        "accumulating",
        "nonfinite",
    },
}


class Health:
    """The diagnosis rules and what they remember between logging steps."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.t = thresholds or Thresholds()
        self.reset()

    def reset(self) -> None:
        self.history: dict[str, Any] = {"step": [], "layers": {}, "totals": {}, "update_ratio": {}}
        self.observed = History()
        # Episode keys active at the last step: "kind" or "kind:layer" or "kind:total".
        self._active: set[str] = set()
        self.alert_counts: dict[str, dict[str, int]] = {}
        self.alerts: list[dict[str, Any]] = []

    def observe(self, obs: Observation) -> list[Alert]:
        """Record one logging step; return the alerts that start at it."""
        self._record(obs)
        self.observed.add(obs)
        findings: list[Finding] = []
        for rule in rules.RULES:
            found = rule(self.observed, self.t)
            findings += found if isinstance(found, list) else [found] if found else []
        active: set[str] = set()
        alerts = []
        # What explains a finding may be seen at this step or have been reported before.
        present = {a["kind"] for a in self.alerts} | {f.kind for f in findings}
        for f in findings:
            keys = {lay: f"{f.kind}:{lay}" for lay in f.layers} if f.details else {}
            whole = f"{f.kind}:{f.key}" if f.key else f.kind
            active.update(keys.values() or [whole])
            if EXPLAINED_BY.get(f.kind, set()) & present:
                continue
            if f.details:
                new = [lay for lay, key in keys.items() if key not in self._active]
                if new:
                    alerts.append(self._alert(obs.step, f, new))
            elif whole not in self._active:
                alerts.append(self._alert(obs.step, f, f.layers))
        self._active = active
        for alert in alerts:
            self.add(alert)
        return alerts

    def add(self, alert: Alert) -> None:
        """An alert found outside the rules (a spike, from every step's values), counted and
        kept with the others."""
        for layer in alert.layers or ["total"]:
            counts = self.alert_counts.setdefault(layer, {})
            counts[alert.kind] = counts.get(alert.kind, 0) + 1
        self.alerts.append(asdict(alert))

    def nonfinite_now(self) -> bool:
        """Whether the last observation saw real (not a GradScaler's) NaN or Inf gradients."""
        return "nonfinite" in self._active

    @staticmethod
    def _alert(step: int, f: Finding, layers: list[str]) -> Alert:
        """The alert of a finding, for the layers whose episode starts (a layered finding's
        message and per-layer evidence name only those)."""
        if not f.details:
            return Alert(step, f.kind, list(layers), f.message, dict(f.evidence), f.fix)
        message = f.message.replace("{layers}", ", ".join(f.details[lay] for lay in layers))
        evidence = {
            k: {lay: v[lay] for lay in layers if lay in v} if _per_layer(v, f) else v
            for k, v in f.evidence.items()
        }
        return Alert(step, f.kind, list(layers), message, evidence, f.fix)

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
            "observations": [asdict(o) for o in self.observed.observations],
            "first_loss": self.observed.first_loss,
            "active": sorted(self._active),
            "alert_counts": {k: dict(v) for k, v in self.alert_counts.items()},
            "alerts": list(self.alerts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        history = dict(state["history"])
        if "total" in history:  # a checkpoint of gradwatch 0.1: one total series
            history["totals"] = {"total": history.pop("total")}
        self.history = history
        # Checkpoints from before the diagnosis rules kept no observations: the rules start
        # afresh from the resumed step, with the run's first loss.
        self.observed = History(
            [Observation(**o) for o in state.get("observations", [])],
            first_loss=state.get("first_loss"),
        )
        self._active = set(state.get("active", _old_episodes(state.get("episodes", {}))))
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


def _per_layer(value: Any, f: Finding) -> bool:
    return isinstance(value, dict) and set(value) <= set(f.details)


def _old_episodes(episodes: dict[str, bool]) -> list[str]:
    """The active episodes of a checkpoint from before the diagnosis rules, as keys."""
    return [("exploding:total" if k == "exploding" else k) for k, v in episodes.items() if v]


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)  # JSON has no NaN or Infinity
