"""Reports from a run's event files: per-layer tables and PNG plots, no training code needed.

    gradwatch-report outputs/xor/<run>                    # tables, plots in <run>/report/
    gradwatch-report outputs/sweeps/xor/<sweep>           # every job of a sweep, overlaid
    gradwatch-report RUN_A RUN_B --out cmp --layers fc1   # two runs, histograms of fc1

Event files are read with TensorBoard's own `EventAccumulator`, so the report shows exactly what
TensorBoard shows. Tags read: `*/loss` (loss curves), `final/*` (the final metrics),
`grad_norm/<layer>`, `grad_norm/<layer>.<param>`, `grad_norm/total`,
`weight_norm/<layer>.<param>`, `update_ratio/<layer>`, histograms `grad_hist/<layer>.<param>` and
`weight_hist/<layer>.<param>`, `alerts` text and the HParams plugin's hyperparameters; and the
run's `gradients.json`, whose alerts name their layers (marked on the plots).

Printed: per run, its layer table and its alerts (plain text); then the hyperparameters as a
table (the keys that differ between the runs; every key of a single run); then the runs ranked
by final loss, as `sweep_results.md` ranks a sweep's jobs, with the same numbers.

Plots written (drawn in `gradwatch.report_plots`): `loss.png`, `grad_norms.png`,
`grad_flow_bars.png` (the monitor's own `grad_flow.png` in the run directory is another plot),
`hist_<layer>.png` per chosen layer, `scalars.png` for `--tags`; and `report.json` with every
number the tables print.

Runs are found and read in `gradwatch.report_runs`. Bad input is one line on stderr, never a
traceback: exit status 2 for bad arguments (nothing written), 1 for a file that cannot be read
(an event file that is garbage or cut short, a folder that cannot be listed: the other runs are
still reported) or written. A bad `overrides.yaml` or `gradients.json` only costs the run its
label or its alert marks: a warning, exit status 0.
"""

import argparse
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradwatch.layers import layer_of
from gradwatch.report_plots import (
    HIST_KINDS,
    grad_flow_bars_figure,
    grad_norms_figure,
    histogram_file_name,
    histogram_grid,
    histograms_figure,
    loss_figure,
    save_figure,
    save_grad_flow,
    tags_figure,
)
from gradwatch.report_runs import (
    DataError,
    Problems,
    ReportError,
    Run,
    find_runs,
    label_runs,
    last_value,
    layer_series,
    layer_table,
    load_run,
)

# Drawn in report_plots; gradwatch.train imports save_grad_flow from here.
__all__ = ["histogram_grid", "main", "report", "save_grad_flow"]

# sweep_results.md's columns (gradwatch.sweep.format_table), then validation where a run has it.
FINAL_KEYS = ("train/loss", "train/acc", "grad_norm/total", "val/loss", "val/acc")


# ------------------------------------------------------------------------------------------------
# Per-run tables
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any, width: int = 12) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.4e}"
    return f"{value!s:>{width}}"


def format_layer_table(rows: dict[str, dict[str, float | None]]) -> str:
    cols = ("first", "last", "min", "max", "update_ratio", "weight_norm")
    heads = ("first", "last", "min", "max", "upd ratio", "weight norm")
    width = max([len("layer"), *(len(k) for k in rows)]) + 2
    lines = [f"{'layer':<{width}}" + "".join(f"{h:>12}" for h in heads)]
    for lay, row in rows.items():
        lines.append(f"{lay:<{width}}" + "".join(_fmt(row[c]) for c in cols))
    return "\n".join(lines)


def plain_text(markdown: str) -> str:
    """An alert as a terminal shows it. TensorBoard's Text tab renders Markdown, so the monitor
    writes `**kind**: message`; printed here, the emphasis marks and code ticks are dropped."""
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", markdown)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    return text.replace("`", "")


def alert_kinds(run: Run) -> dict[str, int]:
    """How many alerts of each kind, in the order they first fired (as metrics.json counts
    them, so as sweep_results.md prints them)."""
    kinds: dict[str, int] = {}
    for _, text in run.alerts:
        match = re.match(r"\*\*(\w[\w ]*)\*\*", text)
        kind = match.group(1) if match else "alert"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


# ------------------------------------------------------------------------------------------------
# The runs table, ranked as sweep_results.md
# ------------------------------------------------------------------------------------------------


def final_values(run: Run) -> tuple[dict[str, float | None], bool]:
    """(values, finished). A finished run's final metrics are metrics.json's, which RunSummary
    also writes as `final/<key>` tags (`final/train_loss`), computed on the whole training set
    after the last step: what sweep_results.md shows. metrics.json's values are float32 results
    (`.item()` of float32 tensors), so TensorBoard's float32 copy of them is exact. For a run
    without `final/` tags (still training, or killed before its end) the last logged values
    stand in."""
    finished = "final/train_loss" in run.scalars
    values = {}
    for key in FINAL_KEYS:
        tag = "final/" + key.replace("/", "_") if finished else key
        values[key] = last_value(run.scalars.get(tag))
    return values, finished


def run_summary(run: Run) -> dict[str, Any]:
    """One row of the runs table: final loss, accuracy and total norm, alerts by kind."""
    steps = sorted({s for steps, _ in run.scalars.values() for s in steps})
    final, finished = final_values(run)
    return {
        "label": run.label,
        "path": str(run.path),
        "steps": [steps[0], steps[-1]] if steps else None,
        "finished": finished,
        "final": final,
        "alerts": alert_kinds(run),
        "monitored": any(t.startswith("grad_norm/") for t in run.scalars),
        "hparams": run.hparams,
    }


def rank_key(summary: dict[str, Any]) -> tuple:
    """sweep_results.md's order (gradwatch.sweep.collect_jobs): finished runs first, lowest final
    train/loss first, ties in folder-name order. Then what the sweep has no row for: a loss of
    NaN, and runs that did not finish, ranked by their last logged loss."""
    loss = summary["final"]["train/loss"]
    unknown = loss is None or math.isnan(loss)
    return (not summary["finished"], unknown, 0.0 if unknown else loss, Path(summary["path"]).name)


def aligned(rows: list[list[str]], right: set[int]) -> str:
    """Rows of cells in columns two spaces apart, the columns numbered in `right` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def short_label(label: str, limit: int = 48) -> str:
    """A run's label in a table: long override lists are cut (the run's own section above the
    tables shows them whole)."""
    return label if len(label) <= limit else label[: limit - 1] + "~"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"  # sweep_results.md's format


def format_runs_table(summaries: list[dict[str, Any]]) -> str:
    """The ranked runs (already in rank order), sweep_results.md's columns and number format,
    and a note under the table for runs whose values are not final metrics."""
    keys = [k for k in FINAL_KEYS if any(s["final"][k] is not None for s in summaries)]
    rows = [["rank", "run", *keys, "alerts"]]
    for rank, s in enumerate(summaries, 1):
        alerts = ", ".join(f"{k} x{n}" for k, n in s["alerts"].items())
        alerts = alerts or ("none" if s["monitored"] else "-")
        rows.append(
            [str(rank), short_label(s["label"]), *(_cell(s["final"][k]) for k in keys), alerts]
        )
    lines = [aligned(rows, right={0, *range(2, 2 + len(keys))})]  # rank and numbers
    unfinished = [str(rank) for rank, s in enumerate(summaries, 1) if not s["finished"]]
    if unfinished:
        lines.append(
            f"rank {', '.join(unfinished)}: no final metrics (the run did not finish): the last"
            " logged values, ranked after the finished runs"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The hyperparameters table
# ------------------------------------------------------------------------------------------------


def _hparam(value: Any) -> str:
    """As the config wrote it: the HParams plugin keeps every number as a float (1000.0)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def hparams_table(runs: list[Run]) -> str | None:
    """One run: every hyperparameter, a row each. Several: a row per run (in rank order) and a
    column per hyperparameter that differs between them. None if no run has any."""
    keys = sorted({k for r in runs for k in r.hparams})
    if not keys:
        return None
    if len(runs) == 1:
        (run,) = runs
        return aligned(
            [["hyperparameter", "value"]] + [[k, _hparam(run.hparams[k])] for k in keys], set()
        )
    differ = [k for k in keys if len({_hparam(r.hparams.get(k)) for r in runs}) > 1]
    if not differ:
        return f"the same {len(keys)} hyperparameters in every run"
    rows = [["rank", "run", *differ]]
    rows += [
        [str(rank), short_label(r.label), *(_hparam(r.hparams.get(k)) for k in differ)]
        for rank, r in enumerate(runs, 1)
    ]
    return aligned(rows, right={0})


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradwatch-report",
        description="Per-layer gradient tables and PNG plots from TensorBoard event files.",
        epilog="exit status: 0 every run reported; 1 a file could not be read or written (the"
        " readable runs are still reported); 2 bad arguments (nothing written)",
    )
    p.add_argument(
        "paths", nargs="+", type=Path, metavar="RUN_DIR", help="run directories or sweep folders"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where the PNGs and report.json go (default: RUN_DIR/report for one path,"
        " else the paths' common parent /report)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="layers whose histograms to plot over time (default: every layer with histograms)",
    )
    p.add_argument(
        "--tags",
        nargs="+",
        metavar="TAG",
        default=[],
        help="more scalar tags to tabulate and plot into scalars.png; globs work: 'weight_norm/*'",
    )
    return p


def match_tags(runs: list[Run], patterns: Sequence[str]) -> list[str]:
    """The scalar tags of any run that `--tags` names, globs matched as fnmatch does."""
    tags = sorted({t for r in runs for t in r.scalars})
    return [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]


def _default_out(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0] / "report"
    return Path(os.path.commonpath([p.resolve() for p in paths])) / "report"


def check_out(out: Path, given: bool) -> None:
    """Refuse an output folder that cannot be written before any run is read, so that a refused
    argument writes nothing (the folder is only made once there is something to put in it)."""
    name = f"--out {out}" if given else f"{out} (the default --out)"
    existing = out
    # os.path.exists, not Path.exists: False rather than PermissionError inside a locked folder.
    while not os.path.exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "it is a file" if existing == out else f"{existing} is a file"
        raise ReportError(f"{name}: {what}; --out must be a folder (or a path that can be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        hint = "" if given else "; give --out DIR"
        raise ReportError(f"{name}: {existing} is not writable (permission denied){hint}")


def say(kind: str, message: str) -> None:
    """One line on stderr whatever the message holds (a YAML problem, a path with a newline)."""
    print(f"gradwatch-report: {kind}: " + " ".join(message.splitlines()), file=sys.stderr)


def print_run(run: Run, summary: dict[str, Any]) -> None:
    """A run's section: where it is, its steps, its layer table, its extra tags, its alerts."""
    print(f"== {run.label}  ({run.path})")
    if summary["steps"]:
        print(f"steps {summary['steps'][0]}..{summary['steps'][1]}")
    if summary["layers"]:
        print("Gradient norms (L2) per layer:")
        print(format_layer_table(summary["layers"]))
    else:
        print("no grad_norm/* tags: was the gradient monitor on?")
    for tag, value in summary["tags"].items():
        print(f"{tag:<32}{_fmt(value)}")
    for step, text in run.alerts:
        print(f"alert at step {step}: {plain_text(text)}")
    print()


def report(
    paths: Sequence[Path],
    out: Path | None = None,
    layers: Sequence[str] | None = None,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """Read the runs under `paths`, print the tables, write the plots; return what was printed.
    Runs that cannot be read are left out and named in `errors`; with none left nothing is
    written."""
    paths = [Path(p) for p in paths]
    problems = Problems()
    run_dirs: list[Path] = []
    for path in paths:
        try:
            run_dirs += find_runs(path, problems)
        except DataError as error:
            problems.errors.append(str(error))
    # After the paths (the default --out is below them), before reading any run; not when no
    # path could be listed: then that is the news, and nothing is written anyway.
    out = Path(out) if out else None
    if run_dirs:
        check_out(out or _default_out(paths), given=out is not None)
    runs = []
    for run_dir in dict.fromkeys(run_dirs):
        try:
            runs.append(load_run(run_dir, problems))
        except DataError as error:
            problems.errors.append(str(error))
    for message in problems.warnings:
        say("warning", message)
    for message in problems.errors:
        say("error", message)
    result: dict[str, Any] = {
        "runs": [],
        "plots": [],
        "errors": problems.errors,
        "warnings": problems.warnings,
    }
    if not runs:
        return result
    label_runs(runs)
    hist_layers = list(
        dict.fromkeys(
            layer_of(t.split("/", 1)[1])
            for r in runs
            for t in r.histograms
            if t.startswith(HIST_KINDS)
        )
    )
    if layers:
        known = set(hist_layers) | {lay for r in runs for lay in layer_series(r)}
        unknown = [lay for lay in layers if lay not in known]
        if unknown:
            raise ReportError(
                f"--layers {' '.join(unknown)}: not in these runs; layers found:"
                f" {' '.join(sorted(known)) or 'none'}"
            )
    extra = match_tags(runs, tags)
    if tags and not extra:
        raise ReportError(f"--tags {' '.join(tags)}: no scalar tag matches in these runs")

    out = out or _default_out(paths)
    summaries = {id(run): run_summary(run) for run in runs}
    # Every table, section and legend in rank order, best first.
    runs.sort(key=lambda run: rank_key(summaries[id(run)]))
    for run in runs:
        summary = summaries[id(run)]
        summary["layers"] = layer_table(run)
        summary["tags"] = {t: last_value(run.scalars.get(t)) for t in extra}
        result["runs"].append(summary)
        print_run(run, summary)
    table = hparams_table(runs)
    if table:
        print("Hyperparameters" + (" that differ:" if len(runs) > 1 else ":"))
        print(table + "\n")
    print("Runs ranked by final train/loss (as sweep_results.md ranks a sweep):")
    print(format_runs_table(result["runs"]))

    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = {
            "loss.png": loss_figure(runs),
            "grad_norms.png": grad_norms_figure(runs),
            "grad_flow_bars.png": grad_flow_bars_figure(runs),
            **{
                histogram_file_name(lay): histograms_figure(runs, lay)
                for lay in (layers or hist_layers)
            },
            "scalars.png": tags_figure(runs, extra),
        }
        result["plots"] = [
            str(save_figure(fig, out / name)) for name, fig in figures.items() if fig is not None
        ]
        (out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    except OSError as error:  # checked writable above; what is left is a full disk or a race
        raise DataError(
            f"{error.filename or out}: cannot write: {error.strerror or error}"
        ) from None
    print(f"\nPlots in {out}: " + ", ".join(Path(p).name for p in result["plots"]))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: every run reported; 1: a file could not be read or written (the readable
    runs are still reported); 2: bad arguments, nothing written."""
    args = _parser().parse_args(argv)
    try:
        result = report(args.paths, out=args.out, layers=args.layers, tags=args.tags)
    except ReportError as error:
        say("error", str(error))
        return 2
    except DataError as error:
        say("error", str(error))
        return 1
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
