"""Each diagnosis rule on a history built by hand: no Trainer, no torch. A rule reads the history
as it stands after a logging step and says what holds now; `Health` turns that into alerts once
per episode, with causes over symptoms."""

import math
import random
import statistics

import pytest

from gradwatch.monitor import rules
from gradwatch.monitor.health import Health
from gradwatch.monitor.history import History, Observation
from gradwatch.monitor.rules import Thresholds

T = Thresholds()


def obs(step, norms=None, loss=1.0, ratios=None, **kwargs):
    norms = norms if norms is not None else {"fc1": 1.0, "fc2": 1.0}
    total = sum(v * v for v in norms.values()) ** 0.5
    kwargs.setdefault("totals", {"total": total})
    kwargs.setdefault("weight_norms", {lay: 10.0 for lay in norms})
    return Observation(
        step=step,
        layer_norms=norms,
        loss=loss,
        update_ratios=ratios if ratios is not None else {lay: 1e-3 for lay in norms},
        **kwargs,
    )


def history(observations, first_loss=None):
    return History(list(observations), first_loss=first_loss)


def kinds(observations, thresholds=T):
    """{step: [(kind, layers)]} of the alerts that start at each step."""
    health, out = Health(thresholds), {}
    for o in observations:
        alerts = health.observe(o)
        if alerts:
            out[o.step] = [(a.kind, a.layers) for a in alerts]
    return out


def test_every_kind_of_the_issue_is_a_rule():
    assert set(rules.KINDS) >= {
        "no_gradient",
        "not_optimized",
        "vanishing",
        "exploding",
        "nonfinite",
        "stall",
        "diverging",
        "dead_units",
        "saturated_units",
        "symmetric_units",
        "skipped_steps",
    }


def test_healthy_history_raises_nothing():
    # The loss falls, every layer moves by 1e-3 of its size, nothing odd anywhere.
    healthy = [obs(s, loss=1.0 / (1 + s)) for s in range(40)]
    for rule in rules.RULES:
        assert not rule(history(healthy), T), rule.__name__
    assert kinds(healthy) == {}


def test_no_gradient_is_a_parameter_without_grad_at_every_log_not_a_small_one():
    logs = [obs(s, no_gradient=["branch.weight", "branch.bias"]) for s in range(3)]
    found = rules.no_gradient(history(logs), T)
    assert found.kind == "no_gradient" and found.layers == ["branch.weight", "branch.bias"]
    # Fewer logs than the patience: not yet.
    assert rules.no_gradient(history(logs[:2]), T) is None
    # Had a gradient once: sometimes unused is not never used.
    logs[1] = obs(1, no_gradient=["branch.bias"])
    assert rules.no_gradient(history(logs), T).layers == ["branch.bias"]
    # A parameter with a tiny gradient is no `no_gradient`: it is in layer_norms, not absent.
    tiny = [obs(s, norms={"fc1": 1e-12, "fc2": 1.0}) for s in range(3)]
    assert rules.no_gradient(history(tiny), T) is None


def test_not_optimized_names_parameters_with_gradients_outside_every_optimizer():
    found = rules.not_optimized(history([obs(0, not_optimized=["fc1.weight"])]), T)
    assert found.layers == ["fc1.weight"] and "configure_optimizers" in found.fix
    assert rules.not_optimized(history([obs(0)]), T) is None


def test_vanishing_needs_patience_and_a_gap_to_the_median():
    low = {"fc1": 1e-8, "fc2": 1.0, "fc3": 1.0}
    logs = [obs(s, norms=low) for s in range(5)]
    found = rules.vanishing(history(logs), T)
    assert found.layers == ["fc1"] and found.evidence["median_layer_norm"] == 1.0
    assert rules.vanishing(history(logs[:4]), T) is None
    # Every layer small together is no vanishing (a stall, or convergence).
    same = [obs(s, norms={"fc1": 1e-8, "fc2": 1e-8}) for s in range(8)]
    assert rules.vanishing(history(same), T) is None


def test_exploding_over_the_running_median_or_the_weights():
    totals = [1.0] * 6 + [50.0]
    logs = [obs(s, totals={"total": v}) for s, v in enumerate(totals)]
    (found,) = rules.exploding(history(logs), T)
    assert found.evidence["running_median"] == 1.0
    # From the first log: a gradient 10x the weights it updates, while the steps stay small.
    big = [obs(0, norms={"fc1": 300.0, "fc2": 300.0}, ratios={"fc1": 1e-3, "fc2": 1e-3})]
    (found,) = rules.exploding(history(big), T)
    assert "weights' norm" in found.message
    # The same with steps as large as the weights is the step size's fault: diverging.
    big[0].update_ratios = {"fc1": 0.5, "fc2": 0.5}
    assert rules.exploding(history(big), T) == []


def test_nonfinite_names_the_layers_and_spares_the_scalers_overflow():
    found = rules.nonfinite(history([obs(0, nonfinite={"fc1": 3, "fc2": 0})]), T)
    assert found.layers == ["fc1"] and "fc1 (3 values)" in found.message
    overflow = obs(0, nonfinite={"fc1": 3}, overflow_expected=True, loss=0.5)
    assert rules.nonfinite(history([overflow]), T) is None
    # Under a scaler even an Inf loss is a skipped step, not applied to the weights.
    overflow.loss = float("inf")
    assert rules.nonfinite(history([overflow]), T) is None


def test_stall_is_a_flat_loss_with_tiny_steps():
    flat = [obs(s, loss=0.25, ratios={"fc1": 1e-5, "fc2": 2e-5}) for s in range(10)]
    found = rules.stall(history(flat), T)
    assert "learning rate looks too small" in found.message
    assert found.evidence["largest_update_ratio"] == 2e-5
    # The same loss with healthy steps is no stall.
    moving = [obs(s, loss=0.25) for s in range(10)]
    assert rules.stall(history(moving), T) is None


def test_diverging_is_a_rising_loss_or_large_steps_without_progress():
    rising = [obs(s, loss=1.0 + s) for s in range(4)]
    assert rules.diverging(history(rising), T).kind == "diverging"
    # Lost most of the progress it made.
    back = [obs(s, loss=v) for s, v in enumerate([1.0, 0.2, 0.1, 0.1, 0.1, 0.7, 0.8, 0.8])]
    assert rules.diverging(history(back), T) is not None
    # Large steps while the loss stays where it started (a loss summed over the batch).
    jumping = [obs(s, loss=0.7, ratios={"fc1": 0.3, "fc2": 0.4}) for s in range(5)]
    assert "change by more than 0.1 of their size" in rules.diverging(history(jumping), T).message
    # Converged and a little noise: no divergence.
    noise = [obs(s, loss=v) for s, v in enumerate([0.25, 0.1, 1e-9, 1e-12, 1e-10, 1e-9])]
    assert rules.diverging(history(noise), T) is None


def test_no_signal_is_a_loss_at_its_start_while_the_weights_move():
    stuck = [obs(s, loss=0.693 + 0.002 * (s % 2), ratios={"fc1": 5e-3}) for s in range(20)]
    found = rules.no_signal(history(stuck, first_loss=0.695), T)
    assert found.kind == "no_signal"
    # The same run with tiny steps is a stall's, not this rule's.
    still = [obs(s, loss=0.693, ratios={"fc1": 1e-5}) for s in range(20)]
    assert rules.no_signal(history(still, first_loss=0.695), T) is None
    # A slow learner (Adam at lr 1e-4 moves its weights by about 1e-3 a step) is not one without
    # signal.
    slow = [obs(s, loss=0.693, ratios={"fc1": 1e-3}) for s in range(20)]
    assert rules.no_signal(history(slow, first_loss=0.695), T) is None
    # Progress made: the loss is a tenth below its start.
    learnt = [obs(s, loss=0.6, ratios={"fc1": 5e-3}) for s in range(20)]
    assert rules.no_signal(history(learnt, first_loss=0.695), T) is None


def test_accumulating_sees_gradients_carried_over_or_evenly_growing_norms():
    carried = [obs(s, carried_gradient=c) for s, c in enumerate([0.0, 3.0, 5.0, 7.0])]
    assert "carried over" in rules.accumulating(history(carried), T).message
    assert rules.accumulating(history(carried[:3]), T) is None  # 0.0 is in the last three
    # Measured and nothing carried over: growing norms are the model's, not zero_grad's.
    measured = [obs(s, totals={"total": 1.0 + s}, loss=0.7, carried_gradient=0.0) for s in range(7)]
    assert rules.accumulating(history(measured), T) is None
    # Not measured (DDP, AMP): norms that grow by about the same amount while the loss stays.
    growing = [obs(s, totals={"total": 1.0 + s}, loss=0.7) for s in range(7)]
    assert "rose at each" in rules.accumulating(history(growing), T).message
    # Growing by factors (a divergence) is not accumulation.
    geometric = [obs(s, totals={"total": 3.0**s}, loss=0.7) for s in range(7)]
    assert rules.accumulating(history(geometric), T) is None


@pytest.mark.parametrize(
    ("rule", "stat", "kind"),
    [
        (rules.dead_units, "dead", "dead_units"),
        (rules.saturated_units, "saturated", "saturated_units"),
        (rules.symmetric_units, "alike", "symmetric_units"),
    ],
)
def test_activation_rules_need_a_share_of_the_units_for_patience_logs(rule, stat, kind):
    def acts(share):
        return {"fc1": {"units": 32.0, "dead": 0.0, "saturated": 0.0, "alike": 0.0, stat: share}}

    logs = [obs(s, activations=acts(1.0)) for s in range(3)]
    found = rule(history(logs), T)
    assert found.kind == kind and found.layers == ["fc1"]
    assert "fc1 (100% of 32 units)" in found.details["fc1"]
    assert rule(history(logs[:2]), T) is None
    assert rule(history([obs(s, activations=acts(0.1)) for s in range(3)]), T) is None


def test_activation_rules_count_the_logs_that_measured_and_hold_between_them():
    """The probe measures some logging steps only: patience counts the measured ones, a log
    without a measurement neither breaks the run nor ends the episode (one alert, not one per
    measurement), and a measurement below the share does end it."""
    dead = {"fc1": {"units": 16.0, "dead": 1.0, "saturated": 0.0, "alike": 0.0}}
    alive = {"fc1": {"units": 16.0, "dead": 0.0, "saturated": 0.0, "alike": 0.0}}
    # Measured at steps 0, 2, 4, 6, 8: dead from the third measurement on.
    logs = [obs(s, activations=dead if s % 2 == 0 else {}) for s in range(9)]
    assert rules.dead_units(history(logs[:4]), T) is None
    found = rules.dead_units(history(logs[:6]), T)
    assert found.layers == ["fc1"] and "step 4" in found.message
    assert rules.dead_units(history(logs[:6] + [obs(5)]), T).layers == ["fc1"]
    assert kinds(logs) == {4: [("dead_units", ["fc1"])]}
    # Alive at the measurement of step 10: the episode ends, and the next one alerts again.
    later = [obs(10, activations=alive), obs(11)] + [obs(s, activations=dead) for s in (12, 13)]
    assert rules.dead_units(history(logs + later[:2]), T) is None
    assert kinds(logs + later + [obs(14, activations=dead)]) == {
        4: [("dead_units", ["fc1"])],
        14: [("dead_units", ["fc1"])],
    }


def test_skipped_steps_is_a_scale_that_keeps_falling():
    falling = [obs(s, amp_scale=65536.0 / 2**s) for s in range(4)]
    found = rules.skipped_steps(history(falling), T)
    assert found.evidence["skipped_at_least"] == 3
    steady = [obs(s, amp_scale=1024.0) for s in range(4)]
    assert rules.skipped_steps(history(steady), T) is None
    assert rules.skipped_steps(history([obs(0, amp_scale=0.5)]), T) is not None
    # Most of the steps since the last log skipped: 6 halvings in 10 steps.
    two = [obs(9, amp_scale=65536.0), obs(19, amp_scale=1024.0)]
    assert rules.skipped_steps(history(two), T) is not None
    two[1].amp_scale = 32768.0  # one skip in ten steps: a scaler finding its scale
    assert rules.skipped_steps(history(two), T) is None


def test_the_cause_wins_over_the_symptom():
    # Layers vanish first; later the loss goes flat with tiny steps: vanishing, never a stall.
    norms = {"fc1": 1e-9, "fc2": 1e-3, "fc3": 1.0}
    logs = [obs(s, norms=norms, loss=0.69, ratios={"fc3": 1e-5}) for s in range(20)]
    fired = kinds(logs)
    assert fired == {4: [("vanishing", ["fc1"])]}
    # Dead units explain the vanishing of the layers below them.
    dead = {"fc1": {"units": 16.0, "dead": 1.0, "saturated": 0.0, "alike": 0.0}}
    logs = [obs(s, norms={"fc1": 0.0, "fc2": 1.0, "fc3": 1.0}, activations=dead) for s in range(8)]
    assert kinds(logs) == {2: [("dead_units", ["fc1"])]}


def test_alerts_carry_kind_layers_step_evidence_and_fix():
    health = Health()
    logs = [obs(s, norms={"fc1": 1e-9, "fc2": 1.0, "fc3": 1.0}) for s in range(5)]
    alerts = [a for o in logs for a in health.observe(o)]
    (alert,) = alerts
    assert (alert.kind, alert.layers, alert.step) == ("vanishing", ["fc1"], 4)
    assert alert.evidence["norms"] == {"fc1": 1e-9} and "ReLU" in alert.fix
    assert alert.line().endswith(f"[vanishing]. Fix: {alert.fix}")
    assert health.summary()["alerts"][0]["evidence"]["median_layer_norm"] == 1.0


def test_history_keeps_the_best_smoothed_loss_as_steps_come():
    """What ``diverging`` compares with, kept step by step, against running medians of five
    finite losses computed over the whole series at once (NaN and None losses skipped)."""
    rng = random.Random(0)
    losses = [rng.uniform(0.1, 3.0) for _ in range(40)]
    losses[7], losses[19] = math.nan, None
    h = History()
    for step, loss in enumerate(losses):
        h.add(obs(step, loss=loss))
        finite = [v for v in losses[: step + 1] if v is not None and math.isfinite(v)]
        medians = [statistics.median(finite[max(0, i - 4) : i + 1]) for i in range(len(finite))]
        assert h.best_smoothed_loss == min(medians)
        assert h.smoothed_loss() == medians[-1]
    # Built at once from the same steps (a restored checkpoint, a test's history): the same.
    assert History(list(h.observations)).best_smoothed_loss == h.best_smoothed_loss


def test_no_update_sees_weights_that_do_not_move_under_a_real_gradient():
    ratios = {"fc1": 0.0, "fc2": 1e-3}
    stuck = [obs(s, ratios=ratios) for s in range(3)]
    finding = rules.no_update(history(stuck), T)
    assert (finding.kind, finding.layers) == ("no_update", ["fc1"])
    assert "learning rate for them is 0" in finding.message  # float32: nothing rounds a 1.0 away
    assert rules.no_update(history(stuck[:2]), T) is None  # 3 logs of patience
    moved = [obs(0, ratios={"fc1": 1e-9, "fc2": 1e-3}), *stuck[1:]]
    assert rules.no_update(history(moved), T) is None
    # bfloat16 weights: the steps are rounded away, 1 part in 128 apart.
    bf16 = [obs(s, ratios=ratios, low_precision={"fc1": "bfloat16"}) for s in range(3)]
    finding = rules.no_update(history(bf16), T)
    assert "they are bfloat16" in finding.message and "1 part in 128" in finding.message
    assert "bf16-mixed" in finding.fix
    # A gradient too small to move anything is vanishing's (any precision rounds it away).
    tiny = [obs(s, norms={"fc1": 1e-9, "fc2": 1.0, "fc3": 1.0}, ratios=ratios) for s in range(3)]
    assert rules.no_update(history(tiny), T) is None
    # Converged (Adam on XOR ends at a loss of 1e-13): resting weights are the goal.
    done = [obs(s, loss=1e-13, ratios=ratios) for s in range(3)]
    assert rules.no_update(history(done, first_loss=0.25), T) is None


def test_nonfinite_in_float16_weights_under_an_eps_float16_rounds_to_0_names_it():
    """float16 weights with Adam at eps 1e-8: its moments are float16 too, the eps is 0 there,
    and a value whose gradient and moments are 0 steps by 0/0: the cause, and its fix."""
    bad = {"fc1": 4.0, "fc2": 0.0}
    finding = rules.nonfinite(history([obs(9, nonfinite=bad, zero_eps={"fc1": 1e-8})]), T)
    assert finding.layers == ["fc1"]
    assert "fc1 are float16" in finding.message and "eps of 1e-08 is 0" in finding.message
    assert "16-mixed" in finding.fix and "eps=1e-4" in finding.fix
    assert finding.evidence["zero_eps"] == {"fc1": 1e-8}
    # Another layer's eps says nothing of fc1's NaN; without one, the usual search for the NaN.
    other = rules.nonfinite(history([obs(9, nonfinite=bad, zero_eps={"fc2": 1e-8})]), T)
    plain = rules.nonfinite(history([obs(9, nonfinite=bad)]), T)
    for finding in (other, plain):
        assert "float16" not in finding.message and "set_detect_anomaly" in finding.fix
        assert "zero_eps" not in finding.evidence


def test_16_bit_weights_rest_once_the_loss_is_a_hundredth_of_the_first():
    """bfloat16 weights cannot follow a loss as far down as float32 ones: at 1e-3 of the first
    loss their steps round away, and that is convergence, not a lost update; float32 weights
    still at that loss are another matter."""
    ratios = {"fc1": 0.0, "fc2": 1e-3}
    bf16 = {"low_precision": {"fc1": "bfloat16"}}
    low = [obs(s, loss=1e-3, ratios=ratios, **bf16) for s in range(3)]
    assert rules.no_update(history(low, first_loss=1.0), T) is None
    wide = [obs(s, loss=1e-3, ratios=ratios) for s in range(3)]
    assert rules.no_update(history(wide, first_loss=1.0), T).layers == ["fc1"]
    above = [obs(s, loss=0.02, ratios=ratios, **bf16) for s in range(3)]
    assert rules.no_update(history(above, first_loss=1.0), T).layers == ["fc1"]


def lost(step, shares, loss=0.7, dtype="bfloat16", **kwargs):
    """A logging step of 16-bit layers that moved (update ratio 1e-4) but left ``shares`` of
    their asked values as they were."""
    kwargs.setdefault("low_precision", dict.fromkeys(shares, dtype))
    norms = dict.fromkeys(shares, 0.1)
    ratios = dict.fromkeys(shares, 1e-4)
    return obs(step, norms=norms, loss=loss, ratios=ratios, rounded_away=shares, **kwargs)


def test_no_update_sees_16_bit_layers_whose_updates_are_mostly_rounded_away():
    n = T.rounded_away_patience
    shares = {"fc1": 0.96, "fc2": 0.3, "fc3": 0.6}
    steps = [lost(s, shares) for s in range(n)]
    finding = rules.no_update(history(steps), T)
    assert (finding.kind, finding.layers) == ("no_update", ["fc1", "fc3"])  # not fc2: 30%
    assert finding.details["fc1"] == "fc1 (96% rounded away)"
    assert "1 part in 128" in finding.message and f"last {n} logged steps" in finding.message
    assert "bf16-mixed" in finding.fix
    assert finding.evidence["rounded_away"] == {"fc1": 0.96, "fc3": 0.6}
    # float16: 1 part in 1024.
    half = rules.no_update(history([lost(s, shares, dtype="float16") for s in range(n)]), T)
    assert "1 part in 1024" in half.message
    # Patience: n logs in a row, each at or over the share.
    assert rules.no_update(history(steps[1:]), T) is None
    dip = [*steps[:3], lost(3, {"fc1": 0.4, "fc2": 0.3, "fc3": 0.6}), *steps[4:]]
    assert rules.no_update(history(dip), T).layers == ["fc3"]


def test_rounded_away_updates_are_no_alert_while_the_loss_comes_down():
    """Converged bfloat16 runs leave most of their tiny steps unapplied too (a healthy ReLU MLP
    with Adam reaches 74%); what makes it a fault is a loss that has not come down."""
    n, shares = T.rounded_away_patience, {"fc1": 0.9}
    # The loss down 10% over the window (its smoothed value, the median of the last five, 8%):
    # learning, if slowly.
    falling = [lost(s, shares, loss=0.7 - 0.07 * s / (n - 1)) for s in range(n)]
    assert rules.no_update(history(falling, first_loss=0.7), T) is None
    flat = [lost(s, shares, loss=0.7 - 0.02 * s / (n - 1)) for s in range(n)]
    assert rules.no_update(history(flat, first_loss=0.7), T).layers == ["fc1"]
    converged_ = [lost(s, shares, loss=1e-4) for s in range(n)]
    assert rules.no_update(history(converged_, first_loss=0.7), T) is None
    # float32 layers have no rounded-away share; the rule reads only 16-bit ones.
    wide = [lost(s, shares, low_precision={}) for s in range(n)]
    assert rules.no_update(history(wide), T) is None
    # A layer whose gradient vanishes next to the others' is vanishing's.
    tiny = [
        obs(
            s,
            norms={"fc1": 1e-9, "fc2": 1.0, "fc3": 1.0},
            loss=0.7,
            rounded_away={"fc1": 1.0},
            low_precision={"fc1": "bfloat16"},
        )
        for s in range(n)
    ]
    assert rules.no_update(history(tiny), T) is None


def test_a_flat_loss_with_rounded_away_updates_is_no_update_not_a_stall():
    """A stall whose updates round away: the cause (16-bit weights), not "raise the learning
    rate or use Adam", which in bfloat16 weights moves nothing either."""
    n = max(T.stall_patience, T.rounded_away_patience)  # both hold at the last step
    steps = [lost(s, {"fc1": 0.95, "fc2": 0.9}, loss=0.25) for s in range(n)]
    assert kinds(steps) == {len(steps) - 1: [("no_update", ["fc1", "fc2"])]}


def test_a_stall_whose_weights_do_not_move_is_reported_as_no_update():
    # The loss flat, every update ratio 0 under gradients of 1: the cause, not the stall.
    flat = [obs(s, loss=0.25, ratios={"fc1": 0.0, "fc2": 0.0}) for s in range(12)]
    found = kinds(flat)
    assert found == {2: [("no_update", ["fc1", "fc2"])]}
