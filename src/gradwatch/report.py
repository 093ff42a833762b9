"""Reports from a run's event files: per-layer tables and PNG plots, no training code needed.

    gradwatch-report outputs/xor/<run>                    # tables, plots in <run>/report/
    gradwatch-report outputs/sweeps/xor/<sweep>           # every job of a sweep, overlaid
    gradwatch-report RUN_A RUN_B --out cmp --layers fc1   # two runs, histograms of fc1

Event files are read with TensorBoard's own `EventAccumulator`, so the report shows exactly what
TensorBoard shows. Tags read: `*/loss` (loss curves), `grad_norm/<layer>`,
`grad_norm/<layer>.<param>`, `grad_norm/total`, `weight_norm/<layer>.<param>`,
`update_ratio/<layer>`, histograms `grad_hist/<layer>.<param>` and `weight_hist/<layer>.<param>`,
`alerts` text and the HParams plugin's hyperparameters.

Plots written: `loss.png`, `grad_norms.png`, `grad_flow_bars.png` (the monitor's
own `grad_flow.png` in the run directory is another plot), `hist_<layer>.png` per chosen layer,
`scalars.png` for `--tags`; and `report.json` with every number the tables print.

Runs are found and read in `gradwatch.report_runs`; this module draws and prints. Bad input is
one line on stderr, never a traceback: exit status 2 for bad arguments (nothing written), 1 for
a file that cannot be read (an event file that is garbage or cut short, a folder that cannot be
listed: the other runs are still reported) or written. A bad `overrides.yaml` only costs the
run its label: a warning, exit status 0.
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

import numpy as np

from gradwatch.layers import layer_of
from gradwatch.report_runs import (
    DataError,
    Problems,
    ReportError,
    Run,
    find_runs,
    label_runs,
    load_run,
)

HIST_KINDS = ("grad_hist", "weight_hist")
GRID_BINS = 80


# ------------------------------------------------------------------------------------------------
# Layers and tables
# ------------------------------------------------------------------------------------------------


def _family(run: Run, family: str) -> dict[str, tuple[list[int], list[float]]]:
    prefix = family + "/"
    return {t[len(prefix) :]: v for t, v in run.scalars.items() if t.startswith(prefix)}


def layer_series(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """`grad_norm/<layer>` per layer (`total` excluded); from the parameters' norms if only those
    were logged. A tag is a parameter when its name minus the last `.part` is also a tag."""
    norms = {k: v for k, v in _family(run, "grad_norm").items() if not k.startswith("total")}
    layers = {k: v for k, v in norms.items() if not (layer_of(k) != k and layer_of(k) in norms)}
    if layers:
        return layers
    out: dict[str, tuple[list[int], list[float]]] = {}
    groups: dict[str, list[str]] = {}
    for name in norms:
        groups.setdefault(layer_of(name), []).append(name)
    for lay, names in groups.items():
        steps = norms[names[0]][0]
        squares = np.sum([np.square(norms[n][1], dtype=np.float64) for n in names], axis=0)
        out[lay] = (steps, np.sqrt(squares).tolist())
    return out


def _last(series: tuple[list[int], list[float]] | None) -> float | None:
    return series[1][-1] if series and series[1] else None


def layer_table(run: Run) -> dict[str, dict[str, float | None]]:
    """Per layer (and `total`): first/last/min/max gradient norm, last update ratio, last weight
    norm (the L2 norm of all the layer's parameters together)."""
    rows: dict[str, dict[str, float | None]] = {}
    series = layer_series(run)
    total = run.scalars.get("grad_norm/total")
    if total:
        series = {**series, "total": total}
    ratios = _family(run, "update_ratio")
    weights = _family(run, "weight_norm")
    for lay, (_, values) in series.items():
        finite = [v for v in values if math.isfinite(v)]
        if lay == "total":
            params = list(weights)
        else:
            params = [n for n in weights if n == lay or layer_of(n) == lay]
        lasts = [_last(weights[n]) for n in params]
        rows[lay] = {
            "first": values[0] if values else None,
            "last": values[-1] if values else None,
            "min": min(finite) if finite else None,
            "max": max(finite) if finite else None,
            "mean": float(np.mean(finite)) if finite else None,
            "update_ratio": _last(ratios.get(lay)),
            "weight_norm": math.sqrt(sum(v * v for v in lasts)) if params else None,
        }
    return rows


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


def loss_tags(run: Run) -> list[str]:
    return sorted(t for t in run.scalars if t == "loss" or t.endswith("/loss"))


def run_summary(run: Run) -> dict[str, Any]:
    """One row of the runs table: final loss and accuracy, final total norm, alerts by kind."""
    kinds: dict[str, int] = {}
    for _, text in run.alerts:
        match = re.match(r"\*\*(\w[\w ]*)\*\*", text)
        kind = match.group(1) if match else "alert"
        kinds[kind] = kinds.get(kind, 0) + 1
    steps = sorted({s for steps, _ in run.scalars.values() for s in steps})
    return {
        "label": run.label,
        "path": str(run.path),
        "steps": [steps[0], steps[-1]] if steps else None,
        "final": {t: _last(run.scalars.get(t)) for t in (*loss_tags(run), "train/acc", "val/acc")}
        | {"grad_norm/total": _last(run.scalars.get("grad_norm/total"))},
        "alerts": kinds,
        "hparams": run.hparams,
    }


def format_runs_table(summaries: list[dict[str, Any]]) -> str:
    keys = sorted({k for s in summaries for k, v in s["final"].items() if v is not None})
    # Long override lists are cut in the table; the run's own header above shows them whole.
    labels = [s["label"] if len(s["label"]) <= 48 else s["label"][:47] + "~" for s in summaries]
    width = max([len("run"), *(len(label) for label in labels)]) + 2
    cols = [max(12, len(k) + 2) for k in keys]
    lines = [
        f"{'run':<{width}}"
        + "".join(f"{k:>{w}}" for k, w in zip(keys, cols, strict=True))
        + "  alerts"
    ]
    for s, label in zip(summaries, labels, strict=True):
        alerts = ", ".join(f"{k} x{n}" for k, n in s["alerts"].items()) or "-"
        cells = "".join(_fmt(s["final"].get(k), w) for k, w in zip(keys, cols, strict=True))
        lines.append(f"{label:<{width}}{cells}  {alerts}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no display, no pyplot global state)
# ------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _positive(values: Sequence[float]) -> list[float]:
    # Log axes: zeros and non-finite values become gaps rather than errors.
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_loss(runs: list[Run], out: Path) -> Path | None:
    if not any(loss_tags(r) for r in runs):
        return None
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    # Log scale unless a loss goes negative; a loss of exactly 0 (XOR solved) is left as a gap.
    log = all(v >= 0 for r in runs for t in loss_tags(r) for v in r.scalars[t][1])
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        for i, tag in enumerate(loss_tags(run)):
            steps, values = run.scalars[tag]
            label = tag if len(runs) == 1 else f"{run.label} {tag}"
            ax.plot(
                steps, _positive(values) if log else values, styles[i % 4], color=color, label=label
            )
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out / "loss.png")


def plot_grad_norms(runs: list[Run], out: Path) -> Path | None:
    """One run: every layer on one axis. Several: one panel per layer, the runs overlaid."""
    series = {id(r): layer_series(r) for r in runs}
    for r in runs:
        if "grad_norm/total" in r.scalars:
            series[id(r)]["total"] = r.scalars["grad_norm/total"]
    layers = list(dict.fromkeys(lay for s in series.values() for lay in s))
    if not layers:
        return None
    if len(runs) == 1:
        fig = _figure(8, 4.5)
        ax = fig.add_subplot()
        _plot_layers(ax, series[id(runs[0])])
        axes = [ax]
        ax.set_title("Gradient L2 norm per layer")
    else:
        ncols = min(2, len(layers))
        nrows = math.ceil(len(layers) / ncols)
        fig = _figure(6 * ncols, 3.2 * nrows)
        axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(layers))]
        for ax, lay in zip(axes, layers, strict=True):
            for run, color in zip(runs, _colors(len(runs)), strict=True):
                if lay in series[id(run)]:
                    steps, values = series[id(run)][lay]
                    ax.plot(steps, _positive(values), color=color, label=run.label)
            ax.set_title(f"grad_norm/{lay}")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient L2 norm")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, out / "grad_norms.png")


def _plot_layers(ax, series: dict[str, tuple[list[int], list[float]]]) -> None:
    """Every layer's series on one log axis, a colour each; totals dashed black."""
    layers = [lay for lay in series if not lay.startswith("total")]
    for lay, color in zip(layers, _colors(len(layers)), strict=True):
        ax.plot(*_gaps(series[lay]), "-", color=color, label=lay)
    for key in (k for k in series if k.startswith("total")):
        ax.plot(*_gaps(series[key]), "k--", label=key)


def _gaps(points: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    steps, values = points
    return steps, _positive(values)


def save_grad_flow(history: dict[str, Any], path: str | Path) -> Path | None:
    """``grad_flow.png`` from a monitor's history (:attr:`GradientMonitor.history`): every layer's
    gradient L2 norm over the steps, the total dashed, log scale. None if nothing was logged."""
    steps = history["step"]
    if not steps:
        return None
    series = {lay: (steps, v) for lay, v in {**history["layers"], **history["totals"]}.items()}
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    _plot_layers(ax, series)
    ax.set_yscale("log")
    ax.set(
        xlabel="step", ylabel="gradient L2 norm", title="Gradient flow: per-layer gradient norms"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_grad_flow(runs: list[Run], out: Path) -> Path | None:
    """Gradient flow: one bar per layer (mean norm over the run), whiskers from min to max."""
    tables = [{k: v for k, v in layer_table(r).items() if k != "total"} for r in runs]
    layers = list(dict.fromkeys(lay for t in tables for lay in t))
    if not layers:
        return None
    fig = _figure(max(6, 1.2 * len(layers) * max(1, len(runs) / 2)), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    x = np.arange(len(layers))
    for i, (run, table, color) in enumerate(zip(runs, tables, _colors(len(runs)), strict=True)):
        rows = [table.get(lay) or {} for lay in layers]
        mean = np.array([r.get("mean") or math.nan for r in rows])
        low = np.array([r.get("min") or math.nan for r in rows])
        high = np.array([r.get("max") or math.nan for r in rows])
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, mean, width, color=color, label=run.label)
        ax.errorbar(pos, mean, yerr=[mean - low, high - mean], fmt="none", ecolor="k", lw=1)
    ax.set_xticks(x, layers)
    ax.set_yscale("log")
    ax.set(xlabel="layer (input to output)", ylabel="gradient L2 norm (mean; min-max)")
    ax.set_title("Gradient flow per layer")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize="small")
    return _save(fig, out / "grad_flow_bars.png")


def histogram_grid(
    rows: list[tuple[int, list[float], list[float], list[float]]], bins: int = GRID_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every step's histogram spread onto one value grid: (steps, grid edges, counts[step, bin])."""
    lows = [min(left[0], *right) for _, left, right, _ in rows if right]
    highs = [max(right) for _, _, right, _ in rows if right]
    lo, hi = (min(lows), max(highs)) if lows else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    grid = np.zeros((len(rows), bins))
    for i, (_, left, right, counts) in enumerate(rows):
        left_a, right_a, counts_a = np.array(left), np.array(right), np.array(counts)
        # Each bucket's count spread evenly over its width; a zero-width bucket lands in one bin.
        overlap = np.clip(
            np.minimum(right_a[:, None], edges[None, 1:])
            - np.maximum(left_a[:, None], edges[None, :-1]),
            0,
            None,
        )
        widths = right_a - left_a
        spread = np.where(
            widths[:, None] > 0, overlap / np.where(widths > 0, widths, 1)[:, None], 0
        )
        grid[i] = counts_a @ spread
        for c, r, w in zip(counts_a, right_a, widths, strict=True):
            if w <= 0 and c:
                grid[i, min(bins - 1, max(0, np.searchsorted(edges, r, side="right") - 1))] += c
    return np.array([r[0] for r in rows]), edges, grid


def plot_histograms(runs: list[Run], layer: str, out: Path) -> Path | None:
    """Histograms over time for one layer: a heatmap per run and per (kind, parameter)."""

    def tags_of(run: Run) -> list[str]:
        return [
            t
            for kind in HIST_KINDS
            for t in sorted(run.histograms, key=lambda t: (not t.endswith(".weight"), t))
            if t.startswith(kind + "/") and layer_of(t[len(kind) + 1 :]) == layer
        ]

    columns = list(dict.fromkeys(t for r in runs for t in tags_of(r)))
    if not columns:
        return None
    fig = _figure(3.6 * len(columns), 2.8 * len(runs) + 0.4)
    for i, run in enumerate(runs):
        for j, tag in enumerate(columns):
            ax = fig.add_subplot(len(runs), len(columns), i * len(columns) + j + 1)
            rows = run.histograms.get(tag)
            if not rows:
                ax.set_axis_off()
                continue
            steps, edges, grid = histogram_grid(rows)
            x = _cell_edges(steps)
            ax.pcolormesh(x, edges, np.log1p(grid.T), cmap="magma", shading="flat")
            title = tag if len(runs) == 1 else f"{run.label}\n{tag}"
            ax.set_title(title, fontsize="small")
            ax.set_xlabel("step", fontsize="small")
            ax.tick_params(labelsize="x-small")
    fig.suptitle(
        f"Histograms over steps, layer {layer} (colour: log(1 + count))", fontsize="medium"
    )
    return _save(fig, out / f"hist_{_safe(layer)}.png")


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def match_tags(runs: list[Run], patterns: Sequence[str]) -> list[str]:
    tags = sorted({t for r in runs for t in r.scalars})
    return [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]


def plot_tags(runs: list[Run], tags: list[str], out: Path) -> Path | None:
    if not tags:
        return None
    ncols = min(2, len(tags))
    nrows = math.ceil(len(tags) / ncols)
    fig = _figure(6 * ncols, 3.2 * nrows)
    for k, tag in enumerate(tags):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for run, color in zip(runs, _colors(len(runs)), strict=True):
            if tag in run.scalars:
                ax.plot(*run.scalars[tag], color=color, label=run.label)
        ax.set(title=tag, xlabel="step")
        ax.grid(True, alpha=0.3)
        if k == 0 and len(runs) > 1:
            ax.legend(fontsize="small")
    return _save(fig, out / "scalars.png")


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
    for run in runs:
        summary = run_summary(run)
        summary["layers"] = layer_table(run)
        summary["tags"] = {t: _last(run.scalars.get(t)) for t in extra}
        result["runs"].append(summary)
        print(f"== {run.label}  ({run.path})")
        if summary["steps"]:
            print(f"steps {summary['steps'][0]}..{summary['steps'][1]}")
        if run.hparams:
            print("hparams: " + ", ".join(f"{k}={v}" for k, v in sorted(run.hparams.items())))
        if summary["layers"]:
            print("Gradient norms (L2) per layer:")
            print(format_layer_table(summary["layers"]))
        else:
            print("no grad_norm/* tags: was the gradient monitor on?")
        for tag, value in summary["tags"].items():
            print(f"{tag:<32}{_fmt(value)}")
        for step, text in run.alerts:
            print(f"alert at step {step}: {text}")
        print()
    print("Final values:")
    print(format_runs_table(result["runs"]))

    try:
        out.mkdir(parents=True, exist_ok=True)
        plots = [plot_loss(runs, out), plot_grad_norms(runs, out), plot_grad_flow(runs, out)]
        plots += [plot_histograms(runs, lay, out) for lay in (layers or hist_layers)]
        plots.append(plot_tags(runs, extra, out))
        result["plots"] = [str(p) for p in plots if p is not None]
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
