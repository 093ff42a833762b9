"""Benchmark gradwatch against plain PyTorch, bare and default Lightning, and other gradient tools.

make bench                                  # every block this machine can run, 7 repeats
make bench ARGS="--quick"                   # 2 repeats, shorter runs: a smoke test, not a result
.venv/bin/python scripts/bench.py --blocks tutorial,mid --repeats 7 --out outputs/bench
make bench ARGS="--blocks fsdp"             # FSDP2 on 2 CPU processes: not in the default set
make bench ARGS="--blocks wandb"            # against wandb.watch (make install EXTRAS=bench)

Every contender runs in its own process (`bench.py --contender '<json>'`), contenders alternate
within a block, in rounds (ABC CBA ABC..., never AAABBB, so drifting machine load hits all of them
alike), and the table shows medians and ratios against the block's baseline. The targets compare
two contenders by the median of their per-round ratios: a round's runs are seconds apart, so a
slow minute on a shared machine cancels out of the ratio instead of landing on one side of it.
A contender prints one JSON line with its own timings: `fit` is `trainer.fit` (for the plain
loop: the loop), `loop` is the training steps alone (first step start to last step end, without the
end-of-training work); the parent times the whole process (interpreter start and imports
included). Every process runs with the same number of torch threads (`--threads`, default 1: the
tutorial's "1 s on one CPU core", and the least sensitive to other load on a shared machine).

Writes `bench_results.json` and `bench_results.md` under `--out` (default outputs/bench/).
This file is the runner; the contenders, the blocks and the targets are in `bench_parts/`.
The top level imports only the standard library and `bench_parts`, whose modules do the same:
the plain contender's process time is the plain script's.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_parts import MARK, METRICS, ROOT
from bench_parts.blocks import BLOCKS, EXTRA_BLOCKS, block_default_repeats, contenders
from bench_parts.targets import markdown, targets


def run_one(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """One contender process: its own timings and the whole process's wall time."""
    payload = json.dumps({"runner": spec["runner"], "params": spec["params"], "threads": threads})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "scripts"), env.get("PYTHONPATH")])
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--contender", payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
    result = json.loads(lines[-1][len(MARK) :])
    result["process"] = wall
    return result


def summarize(specs: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> list[dict]:
    rows = []
    med: dict[str, dict[str, float]] = {}
    for s in specs:
        ok = [r for r in runs[s["key"]] if "error" in r]
        good = [r for r in runs[s["key"]] if "error" not in r]
        med[s["key"]] = {
            m: statistics.median(r[m] for r in good) if good else float("nan") for m in METRICS
        }
        row = {k: s[k] for k in ("block", "name", "label", "baseline")}
        row["n"] = len(good)
        row.update({f"{m}_s": v for m, v in med[s["key"]].items()})
        row["all"] = {m: [round(r[m], 4) for r in good] for m in METRICS}
        row["rounds"] = {
            m: [None if "error" in r else r[m] for r in runs[s["key"]]] for m in METRICS
        }
        if ok:
            row["error"] = ok[-1]["error"]
        reported = [r["fit_reported"] for r in good if "fit_reported" in r]
        if reported:  # gradwatch's own fit_seconds (metrics.json), for comparison
            row["fit_reported_s"] = statistics.median(reported)
        ab = [r["interleaved_pct"] for r in good if "interleaved_pct" in r]
        if ab:  # the monitor's overhead from blocks with and without it in the same run
            row["interleaved_pct"] = statistics.median(ab)
        extra = [r["extra"] for r in good if "extra" in r]
        if extra:  # a contender's own figures for its target, each the median over its runs
            row["extra"] = {k: statistics.median(e[k] for e in extra) for k in extra[0]}
        hooks = [100 * r["monitor_hooks"] / r["loop"] for r in good if r.get("monitor_hooks")]
        if hooks:  # the monitor's own hooks, as a share of the same run's loop
            row["monitor_hooks_pct"] = statistics.median(hooks)
        for r in good:
            if "sync_checked_steps" in r:
                row["sync_checked_steps"] = r["sync_checked_steps"]
        summarize_steps(row, good, runs[s["key"]])
        rows.append(row)
    for row in rows:
        base = med[f"{row['block']}/{row['baseline']}"]
        for m in METRICS:
            row[f"{m}_x"] = row[f"{m}_s"] / base[m] if base[m] else float("nan")
    return rows


def summarize_steps(row: dict, good: list[dict[str, Any]], every_run: list[dict[str, Any]]) -> None:
    """The wandb block's instrument (`bench_parts.contender.steps`): medians over runs of every
    process's CPU and of the logging steps' extra time by clock; the CPU of all processes by
    round too, for ratios in the same round."""
    for m in ("cpu_main", "cpu_others", "cpu_all", "steps"):
        got = [r[m] for r in good if m in r]
        if got:
            row[f"{m}_s" if m != "steps" else m] = statistics.median(got)
            row["rounds"][m] = [r.get(m) for r in every_run]
    for clock in ("wall", "thread_cpu", "process_cpu"):
        got = [r[f"steps_{clock}"] for r in good if r.get(f"steps_{clock}")]
        if not got:
            continue
        keys = ("extra_ms", "spread_ms", "median_ms", "control_ms", "median_step_ms", "extra_pct")
        summary: dict[str, Any] = {k: statistics.median(g[k] for g in got) for k in keys}
        summary["logging_steps"] = got[0]["logging_steps"]
        offsets = zip(*(g["by_offset_ms"] for g in got), strict=True)
        summary["by_offset_ms"] = [statistics.median(v) for v in offsets]
        summary["extra_ms_runs"] = [round(g["extra_ms"], 3) for g in got]
        row[f"steps_{clock}"] = summary


def truth_table(threads: int, timeout: float) -> str:
    """`scripts/bench_truth.py`'s table (what each tool records against the true gradient), run
    in a process of its own like every contender."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), str(ROOT / "scripts"), env.get("PYTHONPATH")])
    )
    script = Path(__file__).resolve().parent / "bench_truth.py"
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    # The table alone: the monitor prints its per-layer summary at each fit's end.
    table = "\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(("|", "(wandb")))
    body = table if proc.returncode == 0 else f"failed: {proc.stderr.strip()[-2000:]}"
    return (
        "### correctness: what each tool records against the true gradient\n\n"
        "(`scripts/bench_truth.py`: the worst parameter's relative error of the recorded L2 norm;"
        " for histograms, the share of values in another bin than the true gradient's)\n\n"
        f"{body}\n"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    code = "import torch, lightning; print(torch.__version__, lightning.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    versions = out.stdout.split()
    torch_v, lightning_v = (versions + ["?", "?"])[:2]
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch_v},"
        f" lightning {lightning_v}, {platform.system()} {platform.release()}"
    )


def cuda_available() -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return out.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--blocks",
        default=",".join(BLOCKS),
        help="comma-separated: " + ", ".join(BLOCKS + EXTRA_BLOCKS),
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per contender (default 7; 2 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and epochs: a smoke test"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every contender")
    parser.add_argument(
        "--only", default="", help="comma-separated contender names to keep (baselines always kept)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "bench",
        help="where the JSON and Markdown go",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per contender process")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="targets from wall time (default) or the loop's CPU time (a busy, shared machine)",
    )
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        from bench_parts.contender import contender_main

        contender_main(json.loads(args.contender))
        return

    repeats = args.repeats or (2 if args.quick else 7)
    notes: list[str] = []
    if args.quick:
        notes.append("--quick: shorter runs and fewer repeats; a smoke test, not a result.")
    specs: list[dict[str, Any]] = []
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    for block in blocks:
        if block == "gpu" and not cuda_available():
            notes.append("gpu: skipped, torch.cuda.is_available() is False on this machine.")
            print("gpu block skipped: no CUDA device (torch.cuda.is_available() is False)")
            continue
        specs += contenders(block, args.quick, notes)
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s["name"] in keep or s["name"] == s["baseline"]]
    for s in specs:
        s["key"] = f"{s['block']}/{s['name']}"
    runs: dict[str, list[dict[str, Any]]] = {s["key"]: [] for s in specs}

    for block in dict.fromkeys(s["block"] for s in specs):
        in_block = [s for s in specs if s["block"] == block]
        # A block measured inside each run (the wandb block) has fewer repeats of its own.
        block_repeats = args.repeats or block_default_repeats(block, repeats)
        if block_repeats != repeats:
            notes.append(f"{block}: {block_repeats} repeats (its instrument resolves in one run).")
        load = os.getloadavg()[0]
        for rep in range(block_repeats):
            # ABC CBA ABC...: load drifts hit every contender alike, and none always runs first.
            for s in in_block if rep % 2 == 0 else in_block[::-1]:
                r = run_one(s, args.threads, args.timeout)
                runs[s["key"]].append(r)
                shown = (
                    r["error"].splitlines()[-1]
                    if "error" in r
                    else f"fit {r['fit']:.3f}s loop {r['loop']:.3f}s cpu {r['loop_cpu']:.3f}s"
                    f" process {r['process']:.3f}s"
                )
                print(f"[{block} {rep + 1}/{block_repeats}] {s['name']:<18} {shown}", flush=True)
        if block == "wandb":
            # The in-run instrument's logging steps stretch more than other steps when other
            # processes want the cores: the load says how far to trust a run.
            notes.append(
                f"wandb: load average {load:.2f} at the block's start, {os.getloadavg()[0]:.2f} at"
                f" its end, on {os.cpu_count()} cores."
            )

    rows = summarize(specs, runs)
    checks = targets(rows, args.clock)
    meta = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, "scripts/bench.py", *sys.argv[1:]]),
        "repeats": repeats,
        "threads": args.threads,
        "clock": args.clock,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "notes": notes,
    }
    text = markdown(rows, checks, meta)
    if "wandb" in blocks:
        text += "\n" + truth_table(args.threads, args.timeout)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_results.md").write_text(text)
    payload = {"meta": meta, "rows": rows, "targets": [list(c) for c in checks]}
    (args.out / "bench_results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_results.md'} and {args.out / 'bench_results.json'}")


if __name__ == "__main__":
    main()
