"""The diagnosis rules: plain Python functions over a :class:`History`, no torch, no Lightning.

Each rule reads the history as it stands after a logging step and returns the :class:`Finding`
that holds now, or None: what is wrong, where, the numbers that show it and what usually fixes
it. Rules do not remember anything; :class:`gradwatch.monitor.health.Health` turns findings into
alerts (once per episode) and lets a cause win over its symptom (a stall while layers vanish is
reported as vanishing). A test builds a history by hand and calls a rule.

The rules, by what they read:

- gradients: ``nonfinite``, ``vanishing``, ``exploding``, ``accumulating``, ``no_gradient``,
  ``not_optimized``, ``skipped_steps``
- the loss with the update ratios: ``stall`` (the learning rate too small), ``diverging`` (too
  large, or a loss summed where it should be averaged), ``no_signal`` (the weights move, the loss
  does not: targets that carry no signal)
- activations: ``dead_units``, ``saturated_units``, ``symmetric_units``
"""

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

from gradwatch.monitor.arguments import check_choice, check_int, check_number
from gradwatch.monitor.history import History, Observation, running_medians

NONFINITE_POLICIES = ("warn", "stop")
# A loss this fraction of the run's first loss means training has converged: tiny gradients are
# the goal, not a fault.
CONVERGED_LOSS_FRACTION = 1e-6
# 16-bit weights cannot follow a loss as far down as float32 ones: the same XOR with Adam ends at
# 4e-6 in bfloat16 weights (0 in float32), a small CNN at 1e-3 of its first loss, their weights
# still because every step left is below their resolution. A 16-bit layer whose loss is below
# this fraction of the first has converged as far as its precision allows.
LOW_PRECISION_CONVERGED = 1e-2
# Losses are compared as medians of this many logs: a mini-batch's loss is noisy.
LOSS_SMOOTHING = History.SMOOTHING
# Gradients summed step after step grow by about the same amount at each step: the largest
# increment at most this many times the smallest.
ACCUMULATING_EVEN = 4.0
# .grad holding more than this many times the step's own gradient besides it, this many logs in a
# row: gradients carried over (a slight excess is a user's own gradient surgery or clipping).
CARRIED_FACTOR = 2.0
CARRIED_PATIENCE = 3


@dataclass
class Thresholds:
    """When the rules fire, each value checked here. The first ones and the activation shares
    are :class:`GradientMonitor` arguments of the same names; the others keep these defaults
    unless a ``Health`` is built by hand."""

    vanishing_threshold: float = 1e-7
    vanishing_fraction: float = 1e-3
    vanishing_patience: int = 5
    exploding_factor: float = 10.0
    exploding_window: int = 50
    stall_update_ratio: float = 3e-4
    stall_loss_tol: float = 1e-2
    stall_patience: int = 10
    on_nonfinite: str = "warn"
    # Diverging: the loss lost this share of the progress it made (or rose this many times above
    # its first value), or the weights move by more than this ratio per step without progress.
    diverging_lost_progress: float = 0.5
    diverging_factor: float = 1.5
    diverging_update_ratio: float = 0.1
    # No signal: after this many logs, the loss still above this share of its first value while
    # the weights move briskly (a layer's update ratio at least this, 10x the stall's line, at
    # every log): a slow learner (Adam at 1e-4 moves by about 1e-3) is not one without signal.
    no_signal_patience: int = 20
    no_signal_progress: float = 0.9
    no_signal_update_ratio: float = 3e-3
    # Accumulating: the total norm grew at each of this many logs in a row, by this factor in all.
    accumulating_patience: int = 6
    accumulating_growth: float = 3.0
    # Parameters without gradient: absent at every one of at least this many logs.
    no_gradient_patience: int = 3
    # Activations: a layer with at least this share of dead, saturated or alike units, for this
    # many logs in a row of those that measured activations.
    dead_fraction: float = 0.75
    saturated_fraction: float = 0.5
    symmetric_fraction: float = 0.5
    activation_patience: int = 3
    # AMP: the GradScaler's scale fell at this many logs in a row (or below 1).
    skipped_patience: int = 3
    # Weights that did not move at all although their gradient is not zero, this many logs.
    no_update_patience: int = 3
    # 16-bit weights that mostly did not move: at least this share of the values their gradient
    # asked to move stayed put, at this many logs in a row, while the loss is still above this
    # share of its first value (a run that learns slowly for it is not reported: see no_update).
    rounded_away_fraction: float = 0.5
    rounded_away_patience: int = 10
    rounded_away_progress: float = 0.95

    def __post_init__(self) -> None:
        for name in (
            "vanishing_patience",
            "exploding_window",
            "no_signal_patience",
            "accumulating_patience",
            "no_gradient_patience",
            "activation_patience",
            "skipped_patience",
            "no_update_patience",
            "rounded_away_patience",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("stall_patience", self.stall_patience, minimum=2)
        for name in (
            "vanishing_threshold",
            "vanishing_fraction",
            "stall_update_ratio",
            "stall_loss_tol",
            "diverging_update_ratio",
            "no_signal_update_ratio",
        ):
            check_number(name, getattr(self, name), "a number >= 0", lambda v: v >= 0)
        for name in ("exploding_factor", "diverging_factor", "accumulating_growth"):
            check_number(name, getattr(self, name), "a number > 1", lambda v: v > 1)
        for name in (
            "diverging_lost_progress",
            "no_signal_progress",
            "dead_fraction",
            "saturated_fraction",
            "symmetric_fraction",
            "rounded_away_fraction",
            "rounded_away_progress",
        ):
            check_number(name, getattr(self, name), "a number in (0, 1]", lambda v: 0 < v <= 1)
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)


@dataclass
class Finding:
    """What a rule sees now.

    ``message`` may hold ``{layers}``: :class:`Health` fills it with ``details`` of the layers
    whose episode starts (a layer already reported is not repeated). ``key`` tells episodes of
    the same kind apart where a rule runs once per total (``exploding``).
    """

    kind: str
    message: str
    fix: str
    layers: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    key: str = ""


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def nonfinite(h: History, t: Thresholds) -> Finding | None:
    """NaN or Inf gradients, naming the layers. Under a GradScaler they are not applied: the
    scaler skips the step (a few times while it finds its scale); ``skipped_steps`` reports it
    when it keeps skipping. In float16 layers whose optimizer's eps float16 rounds to 0
    (``zero_eps``), that is named as the cause."""
    obs = h.last
    bad = {lay: int(c) for lay, c in obs.nonfinite.items() if c > 0}
    if obs.overflow_expected:
        bad = {}
    if not bad and obs.first_bad_step is None:
        return None
    where = ", ".join(f"{lay} ({c} values)" for lay, c in bad.items()) or "none now"
    since = f", first seen at step {obs.first_bad_step}" if obs.first_bad_step is not None else ""
    stop = "; stopping training (on_nonfinite='stop')" if t.on_nonfinite == "stop" else ""
    loss = "" if _finite(obs.loss) or obs.loss is None else f" (the loss is {obs.loss})"
    cause = ""
    fix = (
        "find the first NaN: a log or division of 0 in the loss (clamp, or use the log-space"
        " loss such as BCEWithLogits), NaN or Inf in the inputs (check the data), or a"
        " learning rate so large the weights overflow; torch.autograd.set_detect_anomaly(True)"
        " names the operation"
    )
    zero_eps = {lay: obs.zero_eps[lay] for lay in bad if lay in obs.zero_eps}
    if zero_eps:
        eps = min(zero_eps.values())
        cause = (
            f": the weights of {', '.join(zero_eps)} are float16, and so are the optimizer's"
            f" moments, where its eps of {eps:g} is 0: a value whose gradient and moments are 0"
            " steps by 0/0"
        )
        fix = (
            "keep the weights in float32 (trainer.precision=16-mixed) or use bfloat16"
            " (bf16-true), or give the optimizer an eps float16 holds (eps=1e-4)"
        )
    return Finding(
        "nonfinite",
        f"non-finite gradients at step {obs.step}{since} in layers: {where}{loss}{cause}{stop}",
        fix,
        layers=list(bad),
        evidence={
            "nonfinite_values": bad,
            "loss": _plain(obs.loss),
            "first_bad_step": obs.first_bad_step,
            **({"zero_eps": zero_eps} if zero_eps else {}),
        },
    )


def vanishing(h: History, t: Thresholds) -> Finding | None:
    """Layers whose norm stayed below ``vanishing_fraction`` of the median layer's (or below
    ``vanishing_threshold`` while the median is above it) for ``vanishing_patience`` logs in a
    row; never once the loss has converged, and never when every layer is small together (that is
    a stall, or convergence)."""
    layers = list(h.last.layer_norms)
    low = [
        lay
        for lay in layers
        if len(h.trailing(lambda o, lay=lay: _low(o, lay, h, t), t.vanishing_patience))
        >= t.vanishing_patience
    ]
    if not low:
        return None
    obs = h.last
    median = _median_norm(obs)
    return Finding(
        "vanishing",
        f"vanishing gradients at step {obs.step}: {{layers}} against a median layer norm of"
        f" {median:.3e}, for {t.vanishing_patience} logged steps in a row",
        "the gradient shrinks on its way back through the layers above: use ReLU or GELU rather"
        " than sigmoid or tanh, He or Xavier initialisation, normalisation (BatchNorm, LayerNorm)"
        " or residual connections, or fewer layers",
        layers=low,
        details={lay: f"{lay} {obs.layer_norms[lay]:.3e}" for lay in low},
        evidence={
            "norms": {lay: obs.layer_norms[lay] for lay in low},
            "median_layer_norm": median,
            "logged_steps": t.vanishing_patience,
        },
    )


def exploding(h: History, t: Thresholds) -> list[Finding]:
    """A total norm above ``exploding_factor`` times its running median (over the last
    ``exploding_window`` logs, at least five of them); or, from the first log, the whole model's
    gradient above ``exploding_factor`` times its weights' norm while the optimizer's steps stay
    below ``diverging_update_ratio`` (large steps are ``diverging``'s)."""
    found = []
    obs = h.last
    grad, weight = obs.totals.get("total"), _combined(obs.weight_norms.values())
    ratios = obs.update_ratios.values()
    if (
        grad is not None
        and math.isfinite(grad)
        and weight > 0
        and grad > t.exploding_factor * weight
        and (not ratios or max(ratios) < t.diverging_update_ratio)
    ):
        found.append(
            Finding(
                "exploding",
                f"exploding gradients at step {obs.step}: the total norm {grad:.3e} is more than"
                f" {t.exploding_factor:g}x the weights' norm {weight:.3e}",
                "check the initialisation's scale (the default, He or Xavier), add normalisation"
                " (BatchNorm, LayerNorm), clip the gradients (Trainer(gradient_clip_val=1.0))",
                evidence={"total": grad, "weight_norm": weight},
                key="total",
            )
        )
        return found
    for key, total in h.last.totals.items():
        earlier = [v for v in h.recent_values(key, t.exploding_window + 1)[:-1] if math.isfinite(v)]
        median = statistics.median(earlier) if earlier else 0.0
        if not (
            math.isfinite(total)
            and len(earlier) >= min(5, t.exploding_window)
            and total > t.exploding_factor * median > 0
        ):
            continue
        which = "total norm" if key == "total" else f"{key} norm"
        found.append(
            Finding(
                "exploding",
                f"exploding gradients at step {h.last.step}: {which} {total:.3e} is more than"
                f" {t.exploding_factor:g}x its running median {median:.3e}",
                "clip the gradients (Trainer(gradient_clip_val=1.0)), lower the learning rate,"
                " check the initialisation's scale, or add normalisation",
                evidence={"total": total, "running_median": median, "norm": key},
                key=key,
            )
        )
    return found


def accumulating(h: History, t: Thresholds) -> Finding | None:
    """Gradients summed step after step (no ``zero_grad``): ``.grad`` held more than
    ``CARRIED_FACTOR`` times the step's own backward gradient on top of it, ``CARRIED_PATIENCE``
    logs in a row; or, where that is not measured, the total norm grew by similar amounts at each
    of ``accumulating_patience`` logs in a row, by ``accumulating_growth`` in all, while the loss
    did not fall."""
    carried = [o.carried_gradient for o in h.observations[-CARRIED_PATIENCE:]]
    if len(carried) == CARRIED_PATIENCE and all(
        c is not None and c > CARRIED_FACTOR for c in carried
    ):
        return Finding(
            "accumulating",
            f"gradients carried over from earlier steps at step {h.last.step}: what the optimizer"
            f" steps with is {carried[-1]:.3g} times the step's own gradient on top of it, for"
            f" {CARRIED_PATIENCE} logged steps in a row: zero_grad is not called",
            "call optimizer.zero_grad() every step (with manual optimization, after opt.step());"
            " with accumulation on purpose, zero after each optimizer step",
            evidence={"carried_over_fresh": carried},
        )
    if h.last.carried_gradient is not None:
        return None  # measured: the norms' shape is only a guess where it is not
    series = [o.totals.get("total", math.nan) for o in h.observations]
    n = t.accumulating_patience
    if len(series) <= n or not all(math.isfinite(v) for v in series[-n - 1 :]):
        return None
    window = series[-n - 1 :]
    growing = all(b > a for a, b in zip(window, window[1:], strict=False))
    if not growing or window[-1] < t.accumulating_growth * window[0]:
        return None
    # A sum of similar gradients grows by similar amounts; a divergence grows by similar factors.
    increments = [b - a for a, b in zip(window, window[1:], strict=False)]
    if max(increments) > ACCUMULATING_EVEN * min(increments):
        return None
    losses = [o.loss for o in h.observations[-n - 1 :]]
    if all(_finite(v) for v in losses) and losses[-1] < losses[0]:
        return None
    return Finding(
        "accumulating",
        f"gradients growing step after step at step {h.last.step}: the total norm rose at each"
        f" of the last {n} logged steps, from {window[0]:.3e} to {window[-1]:.3e}, while the loss"
        " did not fall: gradients look accumulated across steps",
        "call optimizer.zero_grad() every step (with manual optimization, after opt.step());"
        " with accumulation on purpose, zero after each optimizer step",
        evidence={"total_norms": window, "losses": [_plain(v) for v in losses]},
    )


def no_gradient(h: History, t: Thresholds) -> Finding | None:
    """Parameters an optimizer steps whose ``.grad`` was None at every logging step (at least
    ``no_gradient_patience`` of them): not small gradients, none at all."""
    if len(h.observations) < t.no_gradient_patience:
        return None
    never = set(h.last.no_gradient)
    for obs in h.observations:
        never &= set(obs.no_gradient)
        if not never:
            return None
    names = [n for n in h.last.no_gradient if n in never]
    return Finding(
        "no_gradient",
        f"parameters without any gradient at step {h.last.step}: {{layers}} had no .grad at"
        f" every one of {len(h.observations)} logged steps",
        "the parameter takes no part in the loss: a branch cut off by .detach(), torch.no_grad()"
        " or .data, or a module the forward never calls; connect it, remove it, or set"
        " requires_grad=False if it is frozen on purpose",
        layers=names,
        details={n: n for n in names},
        evidence={"logged_steps": len(h.observations)},
    )


def not_optimized(h: History, t: Thresholds) -> Finding | None:
    """Parameters that get gradients but are in no optimizer's param groups."""
    names = list(h.last.not_optimized)
    if not names:
        return None
    return Finding(
        "not_optimized",
        f"parameters with gradients that no optimizer steps, at step {h.last.step}: {{layers}}",
        "configure_optimizers leaves them out: pass self.parameters() (or add a param group for"
        " them); if they are frozen on purpose, set requires_grad=False",
        layers=names,
        details={n: n for n in names},
    )


def skipped_steps(h: History, t: Thresholds) -> Finding | None:
    """Under fp16 mixed precision, the GradScaler keeps skipping optimizer steps because the
    gradients overflow: its scale (halved at each skipped step) fell at ``skipped_patience`` logs
    in a row, or by at least half as many halvings as steps since the previous log, or below 1."""
    logged = [(o.step, o.amp_scale) for o in h.observations if o.amp_scale is not None]
    if not logged:
        return None
    n = t.skipped_patience
    scales = [scale for _, scale in logged]
    falling = len(scales) > n and all(
        b < a for a, b in zip(scales[-n - 1 : -1], scales[-n:], strict=True)
    )
    mostly_skipped = False
    if len(logged) >= 2 and scales[-1] > 0:
        (step_before, before), (step_now, now) = logged[-2], logged[-1]
        mostly_skipped = math.log2(before / now) >= 0.5 * max(1, step_now - step_before)
    if not (falling or mostly_skipped or scales[-1] < 1.0):
        return None
    first = scales[-n - 1] if len(scales) > n else scales[0]
    skipped = max(0, round(math.log2(first / scales[-1]))) if scales[-1] > 0 else None
    return Finding(
        "skipped_steps",
        f"the AMP GradScaler keeps skipping steps at step {h.last.step}: its scale fell to"
        f" {scales[-1]:.3g} (from {first:.3g}, at least {skipped} skipped steps): the fp16"
        " values overflow",
        "train in bf16 (precision='bf16-mixed') or fp32, keep the overflowing operation in fp32"
        " (a large sum, a softmax, a loss), scale the inputs down, lower the learning rate, or"
        " clip the gradients",
        evidence={
            "scale": scales[-1],
            "scale_before": first,
            "skipped_at_least": skipped,
            "loss": _plain(h.last.loss),
        },
    )


# ----------------------------------------------------------------------------------------------
# The loss and the update ratios
# ----------------------------------------------------------------------------------------------


def no_update(h: History, t: Thresholds) -> Finding | None:
    """Layers whose weights did not change at all (an update ratio of exactly 0) while their
    gradient was finite and not small (see ``_not_moved``), ``no_update_patience`` logs in a
    row: the optimizer's steps are lost. 16-bit weights (``bf16-true``, ``16-true``) round a
    step smaller than half the gap between two of their numbers back to the same weight; with
    wider weights, the learning rate for them is 0. Or 16-bit layers most of whose updates are
    lost (see ``_mostly_rounded_away``) while the loss has not come down."""
    n = t.no_update_patience
    stuck = [
        lay
        for lay, ratio in h.last.update_ratios.items()
        if ratio == 0.0 and len(h.trailing(lambda o, lay=lay: _not_moved(o, lay, h, t), n)) >= n
    ]
    if not stuck:
        return _mostly_rounded_away(h, t)
    obs = h.last
    dtypes = sorted({obs.low_precision[lay] for lay in stuck if lay in obs.low_precision})
    common = f"the weights of {{layers}} did not change at all at {n} logged steps in a row"
    common += f" (up to step {obs.step}) although their gradients are not zero"
    if dtypes and all(lay in obs.low_precision for lay in stuck):
        message = f"{common}: {_rounding(dtypes)}: every update is lost"
        fix = KEEP_FLOAT32_WEIGHTS
    else:
        message = f"{common}: the optimizer does not move them, its learning rate for them is 0"
        fix = (
            "give their param group a learning rate above 0 (a schedule that reaches 0 stops"
            " training); if they are frozen on purpose, set requires_grad=False"
        )
    return Finding(
        "no_update",
        message,
        fix,
        layers=stuck,
        details={lay: f"{lay} (gradient {obs.layer_norms[lay]:.2e})" for lay in stuck},
        evidence={
            "gradient_norms": {lay: obs.layer_norms[lay] for lay in stuck},
            "update_ratio": 0.0,
            "logged_steps": n,
            "weight_dtypes": {
                lay: obs.low_precision.get(lay, "wider than 16 bits") for lay in stuck
            },
        },
    )


KEEP_FLOAT32_WEIGHTS = (
    "keep the weights in float32 and compute in 16 bits (trainer.precision=bf16-mixed or"
    " 16-mixed rather than bf16-true or 16-true), or use an optimizer that keeps float32"
    " master weights"
)


# The relative gap between two neighbouring 16-bit numbers (torch.finfo(dtype).eps).
_EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


def _rounding(dtypes: list[str]) -> str:
    return (
        f"they are {' and '.join(dtypes)}, whose numbers are about 1 part in"
        f" {1 / _EPS[dtypes[0]]:.0f} apart, and a step of less than half that is rounded back"
        " to the same weight"
    )


def _mostly_rounded_away(h: History, t: Thresholds) -> Finding | None:
    """16-bit layers whose step left at least ``rounded_away_fraction`` of the values their
    gradient asked to move exactly as they were, at each of the last ``rounded_away_patience``
    logs, while the loss (smoothed) is still above ``rounded_away_progress`` of its first value:
    the updates that would train them are mostly lost, and the run does not learn. A layer whose
    gradient vanishes next to the others' is ``vanishing``'s."""
    obs, n, share = h.last, t.rounded_away_patience, t.rounded_away_fraction
    first, now = h.first_loss, h.smoothed_loss()
    if first is None or now is None or first <= 0 or now < t.rounded_away_progress * first:
        return None
    layers = [
        lay
        for lay, lost in obs.rounded_away.items()
        if lost >= share
        and lay in obs.low_precision
        and not _low(obs, lay, h, t)
        and len(h.trailing(lambda o, lay=lay: o.rounded_away.get(lay, 0.0) >= share, n)) >= n
    ]
    if not layers or converged(h, obs):
        return None
    dtypes = sorted({obs.low_precision[lay] for lay in layers})
    return Finding(
        "no_update",
        f"most updates of {{layers}} are lost: at each of the last {n} logged steps (up to step"
        f" {obs.step}) the step left at least {share:.0%} of the weights their gradient asked to"
        f" move exactly as they were, and the loss is still at {now:.4g} (it began at"
        f" {first:.4g}): {_rounding(dtypes)}",
        KEEP_FLOAT32_WEIGHTS,
        layers=layers,
        details={lay: f"{lay} ({obs.rounded_away[lay]:.0%} rounded away)" for lay in layers},
        evidence={
            "rounded_away": {lay: obs.rounded_away[lay] for lay in layers},
            "logged_steps": n,
            "loss": now,
            "first_loss": first,
            "weight_dtypes": {lay: obs.low_precision[lay] for lay in layers},
        },
    )


def _not_moved(obs: Observation, lay: str, h: History, t: Thresholds) -> bool:
    """Unchanged weights under a gradient that should have moved them: one too small to (below
    ``vanishing_threshold``, or vanishing next to the other layers') is rounded away in any
    precision, and is ``vanishing``'s to report; a converged run's weights rest on purpose, and
    16-bit weights rest at a loss a hundredth of the first (see ``LOW_PRECISION_CONVERGED``)."""
    grad = obs.layer_norms.get(lay, 0.0)
    return (
        obs.update_ratios.get(lay) == 0.0
        and math.isfinite(grad)
        and grad > t.vanishing_threshold
        and not _low(obs, lay, h, t)
        and not converged(h, obs)
        and not (lay in obs.low_precision and converged(h, obs, LOW_PRECISION_CONVERGED))
    )


def stall(h: History, t: Thresholds) -> Finding | None:
    """The loss flat (range within ``stall_loss_tol`` of its mean) over ``stall_patience`` logs
    while every layer's update ratio is below ``stall_update_ratio``: the weights barely move."""
    run = h.trailing(
        lambda o: (
            bool(o.update_ratios)
            and max(o.update_ratios.values()) < t.stall_update_ratio
            and _finite(o.loss)
        ),
        t.stall_patience,
    )
    losses = [o.loss for o in run]
    if len(losses) < t.stall_patience:
        return None
    mean = sum(losses) / len(losses)
    if abs(mean) <= 1e-12 or max(losses) - min(losses) > t.stall_loss_tol * abs(mean):
        return None
    ratios = h.last.update_ratios
    worst = max(ratios, key=ratios.get)
    return Finding(
        "stall",
        f"training has stalled at step {h.last.step}: the loss has stayed at {mean:.4g} for"
        f" {len(losses)} logged steps while every layer's update ratio is below"
        f" {t.stall_update_ratio:g} (largest {ratios[worst]:.2e}, {worst}): the learning rate"
        " looks too small",
        "raise the learning rate (10x), or use an adaptive optimizer such as Adam",
        evidence={"loss": mean, "largest_update_ratio": ratios[worst], "layer": worst},
    )


def diverging(h: History, t: Thresholds) -> Finding | None:
    """The loss (a median of ``LOSS_SMOOTHING`` logs) rose ``diverging_factor`` times above its
    first value, or lost ``diverging_lost_progress`` of the progress it had made; or at each of
    the last ``LOSS_SMOOTHING`` logs some layer's weights moved by more than
    ``diverging_update_ratio`` of their size while the loss made no progress: the steps are too
    large."""
    if len(h.recent_losses(2)) < 2 or h.first_loss is None or h.best_smoothed_loss is None:
        return None
    first, best, now = h.first_loss, h.best_smoothed_loss, h.smoothed_loss()
    rising = now > t.diverging_factor * abs(first) + 1e-12 or (
        best < first and now - best > t.diverging_lost_progress * (first - best) and now > 2 * best
    )
    recent = h.observations[-LOSS_SMOOTHING:]
    ratios = [max(o.update_ratios.values()) for o in recent if o.update_ratios]
    large_steps = (
        len(ratios) == len(recent)
        and min(ratios) > t.diverging_update_ratio
        and now > t.no_signal_progress * first
    )
    if not (rising or large_steps):
        return None
    if rising:
        what = f"the loss rose to {now:.4g} (first {first:.4g}, best {best:.4g})"
    else:
        what = (
            f"the weights change by more than {t.diverging_update_ratio:g} of their size per"
            f" step (at least {min(ratios):.2e} at each of the last {len(ratios)} logged steps)"
            f" while the loss stays at {now:.4g}"
        )
    return Finding(
        "diverging",
        f"training is diverging at step {h.last.step}: {what}: the steps are too large",
        "lower the learning rate (10x); if the loss is summed over the batch, average it"
        " (reduction='mean'); add a warm-up or gradient clipping",
        evidence={
            "loss": now,
            "first_loss": first,
            "best_loss": best,
            "largest_update_ratio_at_least": min(ratios) if ratios else None,
        },
    )


def no_signal(h: History, t: Thresholds) -> Finding | None:
    """For ``no_signal_patience`` logs the loss (a median of ``LOSS_SMOOTHING`` logs) stayed above
    ``no_signal_progress`` of its first value while the weights moved briskly (some layer's
    update ratio above ``no_signal_update_ratio`` at every log) and the loss stayed finite:
    the model trains and learns nothing, as when the targets carry no signal about the inputs
    (shuffled labels)."""
    n = t.no_signal_patience
    if len(h.observations) < n or h.first_loss is None:
        return None
    recent = h.observations[-n:]
    losses = [o.loss for o in recent]
    if not all(_finite(v) for v in losses) or not all(o.update_ratios for o in recent):
        return None
    first = h.first_loss
    smooth = running_medians(losses)
    moving = min(max(o.update_ratios.values()) for o in recent) >= t.no_signal_update_ratio
    no_progress = min(smooth) > t.no_signal_progress * first
    if not (moving and no_progress and first > 0):
        return None
    return Finding(
        "no_signal",
        f"the loss is not learning at step {h.last.step}: it has stayed at {smooth[-1]:.4g} (first"
        f" {first:.4g}) for {n} logged steps while the weights move at a healthy rate: the"
        " targets seem to carry no signal about the inputs",
        "check that inputs and targets are paired (no shuffling of one without the other), that"
        " the targets are the right column, and that the loss reads the model's output",
        evidence={"loss": smooth[-1], "first_loss": first, "logged_steps": n},
    )


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def dead_units(h: History, t: Thresholds) -> Finding | None:
    """Layers whose outputs are exactly 0 on every input for at least ``dead_fraction`` of their
    units, ``activation_patience`` measured logs in a row (ReLU units that never fire)."""
    return _activation_rule(
        h,
        t,
        "dead",
        t.dead_fraction,
        "dead_units",
        "dead units at step {step}: {{layers}} output exactly 0 for every input",
        "lower the learning rate (one huge step can kill them), check the bias initialisation"
        " (a large negative bias), use He initialisation or LeakyReLU/GELU",
    )


def saturated_units(h: History, t: Thresholds) -> Finding | None:
    """Layers (sigmoid- or tanh-bounded outputs) with at least ``saturated_fraction`` of their
    units at a bound on nearly every input, ``activation_patience`` measured logs in a row."""
    return _activation_rule(
        h,
        t,
        "saturated",
        t.saturated_fraction,
        "saturated_units",
        "saturated units at step {step}: {{layers}} sit at the flat ends of their activation,"
        " where its derivative is about 0",
        "scale the initial weights down (Xavier initialisation), normalise the inputs, add"
        " normalisation before the activation, or lower the learning rate",
    )


def symmetric_units(h: History, t: Thresholds) -> Finding | None:
    """Layers with at least ``symmetric_fraction`` of their units copies of another unit on every
    input, ``activation_patience`` measured logs in a row: the units got the same initial
    weights, so they get the same gradients and never become different."""
    return _activation_rule(
        h,
        t,
        "alike",
        t.symmetric_fraction,
        "symmetric_units",
        "symmetric units at step {step}: {{layers}} are copies of each other",
        "initialise the weights randomly (the default nn.Linear / nn.Conv init, or"
        " nn.init.kaiming_uniform_), never to zeros or one constant",
    )


def _activation_rule(
    h: History, t: Thresholds, stat: str, share: float, kind: str, message: str, fix: str
) -> Finding | None:
    # Not every logging step measures activations (see ``activations``): the rule reads those
    # that did, and what the last of them showed holds until the next, so an episode goes on.
    def measured():  # newest first
        return (o for o in reversed(h.observations) if o.activations)

    obs = next(measured(), None)
    if obs is None:
        return None
    layers = []
    for lay, stats in obs.activations.items():
        if stats.get("units", 0) < 2 and stat == "alike":
            continue
        run = takewhile(
            lambda o, lay=lay: o.activations.get(lay, {}).get(stat, 0.0) >= share, measured()
        )
        if sum(1 for _ in run) >= t.activation_patience:
            layers.append(lay)
    if not layers:
        return None
    stats = {lay: obs.activations[lay] for lay in layers}
    return Finding(
        kind,
        message.format(step=obs.step),
        fix,
        layers=layers,
        details={
            lay: f"{lay} ({s[stat]:.0%} of {int(s.get('units', 0))} units)"
            for lay, s in stats.items()
        },
        evidence={
            "share": {lay: s[stat] for lay, s in stats.items()},
            "logged_steps": t.activation_patience,
        },
    )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

# Every rule, in the order their alerts are reported within a step.
RULES: list[Callable[[History, Thresholds], Finding | list[Finding] | None]] = [
    nonfinite,
    no_gradient,
    not_optimized,
    skipped_steps,
    dead_units,
    saturated_units,
    symmetric_units,
    vanishing,
    exploding,
    accumulating,
    no_update,
    diverging,
    stall,
    no_signal,
]
KINDS = tuple(rule.__name__ for rule in RULES)


def converged(h: History, obs: Observation, fraction: float = CONVERGED_LOSS_FRACTION) -> bool:
    """Adam on XOR ends at a loss of 1e-13 or exactly 0: gradients that small are the goal."""
    return (
        obs.loss is not None
        and h.first_loss is not None
        and abs(obs.loss) <= fraction * abs(h.first_loss)
    )


def _low(obs: Observation, lay: str, h: History, t: Thresholds) -> bool:
    finite = [v for v in obs.layer_norms.values() if math.isfinite(v)]
    if lay not in obs.layer_norms or len(finite) < 2 or converged(h, obs):
        return False
    v, median = obs.layer_norms[lay], statistics.median(finite)
    return v < t.vanishing_fraction * median or v < t.vanishing_threshold <= median


def _combined(norms) -> float:
    """The L2 norm of parts from the parts' norms."""
    return math.sqrt(math.fsum(v * v for v in norms if math.isfinite(v)))


def _median_norm(obs: Observation) -> float:
    finite = [v for v in obs.layer_norms.values() if math.isfinite(v)]
    return statistics.median(finite) if finite else 0.0


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _plain(value: float | None) -> float | str | None:
    """A float JSON can hold (it has no NaN or Infinity)."""
    if value is None or math.isfinite(value):
        return value
    return str(value)
