"""The targets of the issue, checked on the summarised rows, and the Markdown table of a run.

A target compares two contenders of a block by the median of their per-round ratios: a round's
runs are seconds apart, so a slow minute on a shared machine cancels out of the ratio instead of
landing on one side of it.
"""

import statistics
from typing import Any

from bench_parts import METRICS
from bench_parts.blocks.depth import DEPTHS


def pct(ratio: float | None) -> float | None:
    return None if ratio is None else 100 * (ratio - 1)


def targets(rows: list[dict[str, Any]], clock: str = "wall") -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when not measurable, the numbers) for every target of the issue.

    clock "wall": the tutorial's fit and the other blocks' loop, in wall time (the issue's
    measure); "cpu": the loop's CPU time instead, for a machine shared with other work."""
    fit_m = "fit_s" if clock == "wall" else "loop_cpu_s"
    loop_m = "loop_s" if clock == "wall" else "loop_cpu_s"
    by = {(r["block"], r["name"]): r for r in rows}
    out: list[tuple[str, bool | None, str]] = []

    def check(name: str, value: float | None, limit: float, op: str, unit: str = "x") -> None:
        if value is None or value != value:
            out.append((name, None, "not measured"))
            return
        ok = value <= limit if op == "<=" else value < limit if op == "<" else value >= limit
        out.append((name, ok, f"{value:.3g}{unit} (target {op} {limit:g}{unit})"))

    def monitor_check(name: str, block: str, runs: tuple[str, str], ab: str, limit: float) -> None:
        """The monitor's overhead in %: from the in-run A/B (`ab`, see Interleaver) when it was
        measured, run against run (`runs`: with, without) otherwise; the other figures follow."""
        with_, without = runs
        by_runs = pct(ratio(block, with_, without, loop_m if block != "tutorial" else fit_m))
        in_run = by.get((block, ab), {}).get("interleaved_pct")
        check(
            f"{name} ({'in-run A/B' if in_run is not None else 'run against run'})",
            by_runs if in_run is None else in_run,
            limit,
            "<",
            "%",
        )
        notes = []
        if in_run is not None and by_runs is not None:
            notes.append(f"run against run {by_runs:+.1f}%")
        hooks = by.get((block, with_), {}).get("monitor_hooks_pct")
        if hooks is not None:
            notes.append(f"the monitor's own hooks {hooks:.2f}% of the loop")
        if notes:
            label, ok, detail = out[-1]
            out[-1] = (label, ok, f"{detail}; {'; '.join(notes)}")

    def ratio(block: str, a: str, b: str, metric: str) -> float | None:
        """The median over rounds of a's time over b's in the same round."""
        ra, rb = by.get((block, a)), by.get((block, b))
        if ra is None or rb is None:
            return None
        m = metric.removesuffix("_s")
        pairs = [x / y for x, y in zip(ra["rounds"][m], rb["rounds"][m], strict=True) if x and y]
        return statistics.median(pairs) if pairs else None

    if any(r["block"] == "tutorial" for r in rows):
        check(
            "tutorial: gradwatch fit / bare Trainer fit",
            ratio("tutorial", "gradwatch", "bare", fit_m),
            1.25,
            "<=",
        )
        check(
            "tutorial: gradwatch fit / plain loop",
            ratio("tutorial", "gradwatch", "plain", fit_m),
            4.5,
            "<=",
        )
        # The monitor's own cost on the tutorial's run (issue 3): gradwatch with and without it.
        monitor_check(
            "tutorial: the monitor at defaults",
            "tutorial",
            ("gradwatch", "gradwatch_nomon"),
            "gradwatch_ab",
            3,
        )
        monitor_check(
            "tutorial: the monitor with every histogram every 50 steps",
            "tutorial",
            ("gradwatch_hist50", "gradwatch_nomon"),
            "gradwatch_hist50_ab",
            15,
        )
        monitor_check(
            "tutorial: the monitor with every_step=true",
            "tutorial",
            ("gradwatch_every_step", "gradwatch_nomon"),
            "gradwatch_every_step_ab",
            10,
        )
        noop = by.get(("tutorial", "noop_callback_ab"), {}).get("interleaved_pct")
        if noop is not None:
            out.append(
                (
                    "tutorial, for scale: Lightning's dispatch of one Callback that does nothing"
                    " (in-run A/B)",
                    None,
                    f"{noop:.3g}%: what a Callback costs on one-step epochs when Lightning"
                    " dispatches every hook (gradwatch's skip the step hooks they do not use)",
                )
            )
        check(
            "tutorial: gradwatch process / plain script",
            ratio("tutorial", "gradwatch", "plain", "process_s"),
            4.0,
            "<=",
        )
    for block in ("mid", "gpu"):
        if not any(r["block"] == block for r in rows):
            continue
        # The monitor's per-step cost: the training steps alone (loop), not the one-off
        # end-of-training summary, which the fit column shows.
        monitor_check(
            f"{block}: the monitor at defaults", block, ("monitor", "none"), "monitor_ab", 3
        )
        monitor_check(
            f"{block}: the monitor with every histogram every 50 steps",
            block,
            ("hist_50", "none"),
            "hist_50_ab",
            15,
        )
        monitor_check(
            f"{block}: the monitor with every_step=true",
            block,
            ("every_step", "none"),
            "every_step_ab",
            5,
        )
        floor = by.get((block, "norms_only_ab"), {}).get("interleaved_pct")
        if floor is not None:
            out.append(
                (
                    f"{block}, for scale: every step's gradient norms alone (in-run A/B)",
                    None,
                    f"{floor:.3g}%: a Callback that only takes the norms every_step takes (one"
                    " foreach kernel and a stack per step), every_step's floor",
                )
            )
        check(
            f"{block}: recipe / monitor defaults (loop)",
            ratio(block, "recipe", "monitor", loop_m),
            2,
            ">=",
        )
        check(
            f"{block}: recipe / histograms every 50 (loop)",
            ratio(block, "recipe", "hist_50", loop_m),
            2,
            ">=",
        )
        if block == "gpu":
            row = by.get(("gpu", "sync_check"))
            if row is not None:
                ok = row.get("n", 0) > 0 and "error" not in row
                detail = (
                    f"{row.get('sync_checked_steps', 0)} steps checked"
                    if ok
                    else row.get("error", "")
                )
                out.append(("gpu: no host sync on steps that write nothing", ok, detail))
    out += activation_targets(by, clock)
    out += fsdp_targets(by)
    for task in ("xor", "mid"):
        wandb_targets(by, task, out, ratio)
    if any(r["block"] == "depth" for r in rows):

        def over(d: int) -> float | None:
            """The monitor's overhead at depth ``d``: in-run A/B where it was measured."""
            in_run = by.get(("depth", f"monitor_ab_{d}"), {}).get("interleaved_pct")
            if in_run is not None:
                return in_run / 100
            r = ratio("depth", f"monitor_{d}", f"none_{d}", loop_m)
            return None if r is None else r - 1

        lo, hi = over(DEPTHS[0]), over(DEPTHS[-1])
        in_run = ("depth", f"monitor_ab_{DEPTHS[0]}") in by
        detail = (
            None
            if lo is None or hi is None
            else (hi / lo if lo > 0 else (0.0 if hi <= 0 else float("inf")))
        )
        # A negative or zero overhead at 3 layers (noise) makes the ratio meaningless: show both.
        how = "in-run A/B" if in_run else "run against run"
        check(
            f"depth: overhead at {DEPTHS[-1]} layers / at {DEPTHS[0]} layers ({how})",
            detail,
            1.5,
            "<=",
        )
        if lo is not None and hi is not None:
            out[-1] = (
                out[-1][0],
                out[-1][1],
                out[-1][2] + f"; overheads {100 * lo:+.1f}% and {100 * hi:+.1f}%",
            )
    return out


def activation_targets(by: dict[tuple[str, str], dict[str, Any]], clock: str) -> list[tuple]:
    """Issue 16: the activation statistics at the defaults cost < 1% of the mid MLP's loop, from
    the in-run A/B that switches them alone (`activations_ab`, see ActivationInterleaver): the
    blocks' logging windows on the targets' clock, with the whole blocks' estimate and the
    probe's own clock beside it; on a GPU, for information."""
    out: list[tuple[str, bool | None, str]] = []
    for block, limit in (("mid", 1.0), ("gpu", None)):
        extra = by.get((block, "activations_ab"), {}).get("extra")
        if extra is None:
            continue
        name = f"{block}: the activation statistics at defaults (in-run A/B)"
        value = extra[f"windows_{clock}_pct"]
        detail = f"{value:.3g}%" + (f" (target < {limit:g}%)" if limit is not None else "")
        detail += (
            f"; whole blocks {extra[f'blocks_{clock}_pct']:+.2f}%; the probe's own clock"
            f" {extra['probe_pct']:.2f}% of the blocks it ran in"
        )
        out.append((name, None if limit is None else value < limit, detail))
    return out


def fsdp_targets(by: dict[tuple[str, str], dict[str, Any]]) -> list[tuple]:
    """Issue 18: the monitor's cost under FSDP2 on 2 CPU processes < 3% of the loop, from the
    in-run A/B of `scripts/bench_fsdp.py`: the windows' logging steps with the monitor against
    those without (rank zero's wall clock), with what one run resolves (its standard error), the
    whole windows' estimate and the monitor's own hooks; each figure the median over repeats."""
    row = by.get(("fsdp", "monitor_ab"))
    if row is None:
        return []
    name = "fsdp: the monitor at defaults, FSDP2 on 2 CPU processes (in-run A/B)"
    value, extra = row.get("interleaved_pct"), row.get("extra")
    if value is None or extra is None:
        return [(name, None, row.get("error", "not measured"))]
    detail = (
        f"{value:.3g}% (target < 3%; standard error of a run's {extra['standard_error_pct']:.2g}"
        f" points); whole windows {extra['whole_windows_pct']:+.2f}%"
        f" ({extra['whole_windows_standard_error_pct']:.2g} points), their paired median"
        f" {extra['paired_median_pct']:+.2f}%; the monitor's own hooks {extra['hooks_pct']:.2f}%"
        f" of the steps they ran in; {extra['step_ms_without']:.3g} ms a step without it"
    )
    return [(name, value < 3, detail)]


def monitoring_cpu_ms(row: dict[str, Any], every: int = 50) -> float:
    """CPU of every process per logging step, in ms: the training process's extra over its median
    step (in-run, all its threads), and the other processes' CPU over the run (wandb's service;
    TensorBoard has none) shared over its logging steps."""
    logging_steps = max(1, row.get("steps", 0) // every)
    return row["steps_process_cpu"]["extra_ms"] + 1e3 * row["cpu_others_s"] / logging_steps


def wandb_targets(by: dict, task: str, out: list, ratio: Any) -> None:
    """The wandb block's targets on one task, at equal work (every gradient and weight histogram
    every 50 steps), each tool over its own logger alone: gradwatch's extra wall time per logging
    step at most wandb.watch's, and its CPU of all processes per logging step lower. gradwatch
    both as its command line writes TensorBoard (C checksums) and as a library (TensorBoard's)."""
    names = ("tb", "gw_all", "gw_all_lib", "wandb", "watch")
    rows = {n: by.get(("wandb", f"{task}_{n}")) for n in names}
    if any(r is None or "steps_process_cpu" not in r for r in rows.values()):
        return
    extra = {n: r["steps_wall"]["extra_ms"] for n, r in rows.items()}
    cpu = {n: monitoring_cpu_ms(r) for n, r in rows.items()}
    service = {n: cpu[n] - rows[n]["steps_process_cpu"]["extra_ms"] for n in ("watch", "wandb")}
    wb, wb_cpu = extra["watch"] - extra["wandb"], cpu["watch"] - cpu["wandb"]
    for gw_name, how in (("gw_all", "command line"), ("gw_all_lib", "library")):
        gw, gw_cpu = extra[gw_name] - extra["tb"], cpu[gw_name] - cpu["tb"]
        out.append(
            (
                f"wandb, {task}: at equal work, extra wall time per logging step over the"
                f" logger's own (in-run), gradwatch ({how}) <= wandb.watch",
                gw <= wb,
                f"gradwatch {gw:.2f} ms (with TensorBoard {extra[gw_name]:.2f}, TensorBoard alone"
                f" {extra['tb']:.2f}), wandb.watch {wb:.2f} ms (with WandbLogger"
                f" {extra['watch']:.2f}, WandbLogger alone {extra['wandb']:.2f})",
            )
        )
        out.append(
            (
                f"wandb, {task}: at equal work, CPU of all processes per logging step over the"
                f" logger's own, gradwatch ({how}) < wandb.watch",
                gw_cpu < wb_cpu,
                f"gradwatch {gw_cpu:.2f} ms, wandb.watch {wb_cpu:.2f} ms (wandb's other"
                f" processes {service['watch']:.2f} ms with watch, {service['wandb']:.2f} ms"
                " without)",
            )
        )
    run_cpu = ratio("wandb", f"{task}_gw_all", f"{task}_watch", "cpu_all_s")
    if run_cpu is not None:
        out.append(
            (
                f"wandb, {task}, for scale: CPU of all processes, first step to the run's end,"
                " gradwatch + TensorBoard / wandb.watch + WandbLogger (run against run)",
                None,
                f"{run_cpu:.3g}x (medians {rows['gw_all']['cpu_all_s']:.2f} s and"
                f" {rows['watch']['cpu_all_s']:.2f} s: the steps' own work, which run against"
                " run swamps the monitoring's)",
            )
        )


def steps_table(rows: list[dict[str, Any]]) -> list[str]:
    """The in-run instrument's table (`bench_parts.contender.steps`), for rows that have it."""
    lines = [
        "| contender | extra wall per logging step, ms | ± | median window | control | by run"
        " | training process CPU, ms | of it the training thread | other processes, ms"
        " | median step, ms | run CPU, all processes, s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in rows:
        w, t = r["steps_wall"], r.get("steps_thread_cpu", {})
        pc = r.get("steps_process_cpu", {})
        others = 1e3 * r.get("cpu_others_s", nan) / max(1, r.get("steps", 0) // 50)
        lines.append(
            f"| {r['label']} | {w['extra_ms']:.2f} | {w['spread_ms']:.2f} | {w['median_ms']:.2f}"
            f" | {w['control_ms']:.2f} | {', '.join(f'{v:.2f}' for v in w['extra_ms_runs'])}"
            f" | {pc.get('extra_ms', nan):.2f} | {t.get('extra_ms', nan):.2f} | {others:.2f}"
            f" | {w['median_step_ms']:.3f} | {r.get('cpu_all_s', nan):.2f} |"
        )
    return lines


def markdown(rows: list[dict[str, Any]], checks: list, meta: dict[str, Any]) -> str:
    lines = [
        f"Machine: {meta['machine']}",
        f"Command: `{meta['command']}`",
        f"Repeats: {meta['repeats']} (medians; targets: medians of per-round ratios),"
        f" torch threads: {meta['threads']},"
        f" targets on {meta['clock']} time, {meta['date']}",
        "",
    ]
    for block in dict.fromkeys(r["block"] for r in rows):
        lines += [
            f"### {block}",
            "",
            "| contender | fit s | x | loop s | x | loop CPU s | x | process s | x"
            " | monitor hooks, % of loop |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r["block"] == block):
            cells = [f"{r[f'{m}_s']:.3f} | {r[f'{m}_x']:.2f}" for m in METRICS]
            hooks = r.get("monitor_hooks_pct")
            cells.append("-" if hooks is None else f"{hooks:.2f}")
            note = " (failed)" if r["n"] == 0 else ""
            lines.append(f"| {r['label']}{note} | " + " | ".join(cells) + " |")
        lines.append("")
        stepped = [r for r in rows if r["block"] == block and "steps_wall" in r]
        if stepped:
            lines += [f"In-run instrument ({block}):", "", *steps_table(stepped), ""]
    lines += ["### targets", ""]
    for name, ok, detail in checks:
        verdict = "PASS" if ok else "FAIL" if ok is False else "N/A"
        if ok is None and detail != "not measured":
            verdict = "info"  # a figure for scale, not a target
        lines.append(f"- {verdict}: {name}: {detail}")
    for note in meta["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"
