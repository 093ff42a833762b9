"""The benchmark's arithmetic: medians, ratios and targets from per-round timings (no timing)."""

import bench
import pytest
from bench_parts.contender.activations_ab import ActivationInterleaver
from bench_parts.contender.clocks import Interleaver


def spec(block, name, baseline):
    return {
        "block": block,
        "name": name,
        "label": name,
        "baseline": baseline,
        "key": f"{block}/{name}",
    }


def run(seconds):
    return {m: seconds for m in bench.METRICS}


def mid_rows(none, monitor, hist, recipe):
    names = ("none", "monitor", "hist_50", "recipe")
    specs = [spec("mid", n, "none") for n in names]
    runs = {
        f"mid/{n}": [run(t) for t in times]
        for n, times in zip(names, (none, monitor, hist, recipe), strict=True)
    }
    return bench.summarize(specs, runs)


def test_table_shows_medians_and_ratios_of_medians():
    rows = mid_rows([1.0, 2.0, 3.0], [1.5, 1.5, 9.0], [1.1, 2.2, 3.3], [4.0, 8.0, 12.0])
    by = {r["name"]: r for r in rows}
    assert by["none"]["loop_s"] == 2.0 and by["monitor"]["loop_s"] == 1.5
    assert by["monitor"]["loop_x"] == 0.75
    assert by["recipe"]["loop_x"] == 4.0


def test_targets_use_the_median_of_per_round_ratios():
    # The machine slows down 3x in round 2 for every contender alike: the medians of the
    # contenders' own times would compare a fast run with a slow one, the rounds do not.
    none = [1.00, 3.00, 1.02]
    monitor = [1.02, 3.06, 1.0404]  # +2% in every round
    hist = [1.10, 3.30, 1.122]  # +10%
    recipe = [2.50, 7.50, 2.55]
    checks = {
        name: (ok, detail)
        for name, ok, detail in bench.targets(mid_rows(none, monitor, hist, recipe))
    }
    ok, detail = checks["mid: the monitor at defaults (run against run)"]
    assert ok and detail.startswith("2%")
    ok, detail = checks["mid: the monitor with every histogram every 50 steps (run against run)"]
    assert ok and detail.startswith("10%")
    ok, detail = checks["mid: recipe / monitor defaults (loop)"]
    assert ok and detail.startswith("2.45x")


def test_a_target_fails_and_a_failed_run_is_left_out_of_its_round():
    none = [1.0, 1.0, 1.0]
    monitor = [1.05, 1.05, 1.05]  # +5%: over the 3% target
    rows = mid_rows(none, monitor, [1.1] * 3, [1.5] * 3)
    checks = {name: (ok, detail) for name, ok, detail in bench.targets(rows)}
    assert checks["mid: the monitor at defaults (run against run)"][0] is False
    assert checks["mid: recipe / monitor defaults (loop)"][0] is False  # 1.43x < 2x
    specs = [spec("mid", "none", "none"), spec("mid", "monitor", "none")]
    runs = {
        "mid/none": [run(1.0), {"error": "exit 1"}, run(1.0)],
        "mid/monitor": [run(1.02), run(9.0), run(1.02)],
    }
    rows = bench.summarize(specs, runs)
    checks = {name: (ok, detail) for name, ok, detail in bench.targets(rows)}
    ok, detail = checks["mid: the monitor at defaults (run against run)"]
    assert ok and detail.startswith("2%")


def test_in_run_ab_takes_the_typical_pair_and_weighs_the_histogram_pairs():
    """20 blocks of 50 steps: the monitor in the second block of even pairs and the first of odd
    ones. Without it a block takes 1 s; with it 1.02 s, and 1.52 s where the block ends on a
    histogram step (step 499, block 9: the one of blocks 9 and 19 that has the monitor). A
    burst makes one block without the monitor take 3 s. Per block the monitor costs 0.02 s plus
    a tenth of a histogram's 0.5 s: 7%."""
    inter = Interleaver(block=50, hist_every=500)
    inter.on = [inter.monitor_in(i) for i in range(20)]
    assert [i for i in range(20) if inter.on[i]][:6] == [1, 2, 5, 6, 9, 10]
    times = [1.02 if on else 1.0 for on in inter.on]
    times[9] = 1.52
    times[4] = 3.0
    inter.starts = [sum(times[:i]) for i in range(20)]
    assert inter.overhead_pct(end=sum(times)) == pytest.approx(7.0)


def test_in_run_ab_leaves_out_pairs_where_an_epoch_starts():
    """Epochs of 469 steps start at steps 469 and 938: their set-up (a 140 ms shuffle) lands in
    the blocks of steps 468 and 937 (blocks 9 and 18, both with the monitor). Counted, their
    pairs would make the estimate 22%."""
    inter = Interleaver(block=50, hist_every=500, epoch_steps=469)
    inter.on = [inter.monitor_in(i) for i in range(20)]
    times = [1.03 if on else 1.0 for on in inter.on]
    times[9] += 0.5
    times[9] += 1.4
    times[18] += 1.4
    inter.starts = [sum(times[:i]) for i in range(20)]
    assert [w for w, _, _ in inter.pairs()] == [1, 2, 5, 6, 10, 13, 14, 17]
    assert inter.overhead_pct(end=sum(times)) == pytest.approx(3.0)
    # Tutorial-like one-step epochs are shorter than a block: nothing is left out.
    assert Interleaver(block=50, hist_every=0, epoch_steps=1).epoch_steps == 0


def test_in_run_ab_leaves_out_checkpoint_pairs_and_keeps_histogram_pairs():
    """gradwatch's defaults: histograms every 500 steps, last.ckpt every 1000. The saves after
    steps 999 and 1999 (blocks 19 and 39) leave their pairs out; the histogram steps 499 and 1499
    (blocks 9 and 29) have the monitor, in pairs that are kept."""
    inter = Interleaver(block=50, hist_every=500, checkpoint_every=1000)
    inter.on = [inter.monitor_in(i) for i in range(40)]
    pairs = inter.pairs()
    assert len(pairs) == 18
    assert not {18, 19, 38, 39} & {block for pair in pairs for block in pair[:2]}
    assert [w for w, _, hist in pairs if hist] == [9, 29]


def test_the_activation_statistics_target_reads_their_own_in_run_ab():
    """The mid block's activations_ab row: its logging windows' estimate against the 1% target
    on the targets' clock, the whole blocks' and the probe's own clock beside it; a gpu row is
    shown for information."""
    extra = {
        "probe_pct": 0.3,
        "windows_wall_pct": 0.4,
        "windows_cpu_pct": 1.2,
        "blocks_wall_pct": -0.5,
        "blocks_cpu_pct": 2.0,
    }
    rows = [
        {"block": "mid", "name": "activations_ab", "extra": extra},
        {"block": "gpu", "name": "activations_ab", "extra": {**extra, "windows_wall_pct": 2.5}},
    ]
    name = "mid: the activation statistics at defaults (in-run A/B)"
    checks = {name: (ok, detail) for name, ok, detail in bench.targets(rows)}
    assert checks[name] == (
        True,
        "0.4% (target < 1%); whole blocks -0.50%; the probe's own clock 0.30% of the blocks it"
        " ran in",
    )
    ok, detail = checks["gpu: the activation statistics at defaults (in-run A/B)"]
    assert ok is None and detail.startswith("2.5%;")
    checks = {name: (ok, detail) for name, ok, detail in bench.targets(rows, clock="cpu")}
    assert checks[name][0] is False and checks[name][1].startswith(
        "1.2% (target < 1%); whole blocks +2.00%"
    )


def test_the_activation_ab_compares_the_logging_windows_by_their_mean():
    """24 blocks of 50 steps of 1 s; their last two steps (the window) take 0.04 s. With the
    statistics, one logging step in four takes 0.09 s more (the others nothing); a burst makes a
    block without them 3 s long, outside its window, and the first logging step (block 0's)
    warms up for 0.5 s. Left out: the first pair, and those holding a histogram step (blocks 9
    and 19, every 500 steps): 9 pairs kept, 2 of them with a measuring step, so the windows'
    mean is 0.02 s a block, 2%; the median pair, as the whole blocks' median, sees nothing."""
    inter = ActivationInterleaver.__new__(ActivationInterleaver)
    Interleaver.__init__(inter, block=50, hist_every=500)
    inter.on = [inter.monitor_in(i) for i in range(24)]
    times, window = [1.0] * 24, [0.04] * 24
    for i in [i for i in range(24) if inter.on[i]][1::4]:  # blocks 2, 10 and 18
        times[i] += 0.09
        window[i] += 0.09
    times[4] = 3.0
    times[0] += 0.5
    window[0] += 0.5
    inter.starts = [sum(times[:i]) for i in range(24)]
    inter.cpu_starts = list(inter.starts)
    inter.window_starts = {i: (inter.starts[i] + times[i] - window[i],) * 2 for i in range(24)}
    assert [w for w, _, _ in inter.pairs()] == [2, 5, 6, 10, 13, 14, 17, 21, 22]
    est = inter.estimates(end=sum(times), cpu_end=sum(times))
    assert est["windows_wall_pct"] == pytest.approx(2.0) == est["windows_cpu_pct"]
    assert est["blocks_wall_pct"] == pytest.approx(0.0)


def test_the_fsdp_target_is_its_in_run_ab_with_its_standard_error():
    extra = {
        "standard_error_pct": 0.21,
        "whole_windows_pct": 0.77,
        "whole_windows_standard_error_pct": 3.74,
        "paired_median_pct": -0.23,
        "hooks_pct": 0.58,
        "step_ms_without": 24.265,
    }
    rows = [{"block": "fsdp", "name": "monitor_ab", "interleaved_pct": 0.4, "extra": extra}]
    name = "fsdp: the monitor at defaults, FSDP2 on 2 CPU processes (in-run A/B)"
    checks = {name: (ok, detail) for name, ok, detail in bench.targets(rows)}
    assert checks[name] == (
        True,
        "0.4% (target < 3%; standard error of a run's 0.21 points); whole windows +0.77%"
        " (3.7 points), their paired median -0.23%; the monitor's own hooks 0.58% of the steps"
        " they ran in; 24.3 ms a step without it",
    )
    rows[0]["interleaved_pct"] = 3.5
    assert {n: ok for n, ok, _ in bench.targets(rows)}[name] is False
    # A failed run (bench_fsdp.py exited) is shown, not passed.
    rows = [{"block": "fsdp", "name": "monitor_ab", "error": "exit 1: gloo", "n": 0}]
    assert {n: (ok, d) for n, ok, d in bench.targets(rows)}[name] == (None, "exit 1: gloo")


def test_logging_excess_finds_the_logging_steps_cost_and_reads_zero_elsewhere():
    from bench_parts.contender.steps import logging_excess

    # 1 ms steps; every logging step (49, 99, ...) 3 ms more, the step after it 1 ms more (a
    # writer thread's work landing late); a preempted step in one logging window and in one
    # control window (25 steps later) alike: the control takes it out of the mean.
    times = [1e-3] * 1000
    for s in range(49, 1000, 50):
        times[s] += 3e-3
        if s + 1 < 1000:
            times[s + 1] += 1e-3
    times[451] += 0.05
    times[476] += 0.05
    got = logging_excess(times, every=50, window=5)
    assert got["logging_steps"] == 18  # the first logging step and the last window left out
    assert got["extra_ms"] == pytest.approx(4.0)  # the trimmed means leave both out
    assert got["median_ms"] == pytest.approx(4.0)
    assert got["control_ms"] == pytest.approx(0.0)
    assert got["by_offset_ms"][:2] == pytest.approx([3.0, 1.0])
    assert got["extra_pct"] == pytest.approx(100 * 4e-3 / (50 * 1e-3))


def wandb_block(extra, cpu, others):
    """Rows of the wandb block's xor task: in-run extras (ms; process CPU as wall), the CPU of
    all processes by round, and the other processes' CPU (s) over 1000 steps."""
    names = ("tb", "gw_all", "gw_all_lib", "wandb", "watch")
    specs = [spec("wandb", f"xor_{n}", "xor_tb") for n in names]
    runs = {}
    for n in names:
        steps = {"extra_ms": extra[n], "spread_ms": 0.1, "median_ms": extra[n]}
        steps |= {"control_ms": 0.0, "median_step_ms": 1.0, "extra_pct": 1.0}
        steps |= {"logging_steps": 18, "by_offset_ms": [extra[n], 0.0]}
        runs[f"wandb/xor_{n}"] = [
            {
                **run(1.0),
                "steps": 1000,
                "steps_wall": steps,
                "steps_process_cpu": steps,
                "cpu_main": c,
                "cpu_others": others[n],
                "cpu_all": c + others[n],
            }
            for c in cpu[n]
        ]
    return bench.summarize(specs, runs)


def test_wandb_targets_compare_each_tool_over_its_own_logger():
    extra = {"tb": 1.0, "gw_all": 3.5, "gw_all_lib": 5.0, "wandb": 1.5, "watch": 4.5}
    # wandb's service: 0.02 s over 20 logging steps alone (1 ms each), 0.06 s with watch (3 ms).
    others = {"tb": 0.0, "gw_all": 0.0, "gw_all_lib": 0.0, "wandb": 0.02, "watch": 0.06}
    cpu = {n: [1.0, 3.0, 1.0] for n in extra}
    checks = {
        name: (ok, detail) for name, ok, detail in bench.targets(wandb_block(extra, cpu, others))
    }
    line = "wandb, xor: at equal work, extra wall time per logging step over the logger's own"
    ok, detail = checks[f"{line} (in-run), gradwatch (command line) <= wandb.watch"]
    assert ok and detail.startswith("gradwatch 2.50 ms") and "wandb.watch 3.00 ms" in detail
    ok, detail = checks[f"{line} (in-run), gradwatch (library) <= wandb.watch"]
    assert ok is False and detail.startswith("gradwatch 4.00 ms")
    line = "wandb, xor: at equal work, CPU of all processes per logging step over the logger's own"
    ok, detail = checks[f"{line}, gradwatch (command line) < wandb.watch"]
    # wandb.watch: 3.0 ms in the training process + 2.0 ms more in its service.
    assert ok and detail.startswith("gradwatch 2.50 ms, wandb.watch 5.00 ms")
    ok, detail = checks[f"{line}, gradwatch (library) < wandb.watch"]
    assert ok and detail.startswith("gradwatch 4.00 ms")
