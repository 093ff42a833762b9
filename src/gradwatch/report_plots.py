"""The plots of `gradwatch-report`, and the monitor's `grad_flow.png`: each `*_figure` function
draws one matplotlib Figure from runs read by `gradwatch.report_runs`; `save_figure` writes it.

The same conventions in every plot:

- Layers are told apart by colour: tab10 up to 10 layers (the largest matplotlib palette whose
  colours are all distinct at a glance; tab20 and Paired pair near-identical shades); beyond
  that a sequential colormap ordered by depth, every other layer dashed so neighbours differ
  twice. Runs overlaid on one chart are coloured the same way.
- On a log axis a value of exactly 0 (a solved XOR's loss, a layer whose gradient died) has no
  place: it is drawn as a triangle on the bottom edge, and its series says "0 from step N".
- An alerted series has a black-ringed dot at the alert's step and "(alert: kind at step N)" in
  its legend label (alerts from the run's `gradients.json`; an alert naming no layer, a stall
  or an exploding total, is on `total`).
- Legends sit outside the axes, on the right; the figure is widened to hold them.

Figures use matplotlib's object API on the Agg canvas: no display, no pyplot global state.
matplotlib is imported inside the functions: `gradwatch.train` imports this module for
`grad_flow.png`, and a run should not pay for matplotlib's import before it trains.
"""

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.layers import layer_of
from gradwatch.report_runs import (
    AlertMark,
    Run,
    alerts_on,
    layer_series,
    layer_table,
    loss_tags,
)

HIST_KINDS = ("grad_hist", "weight_hist")
GRID_BINS = 80
# tab10's size: past it, colours come from a sequential colormap ordered by depth.
QUALITATIVE_MAX = 10
# Legend entries per column before the legend takes another column (the figure is ~4.5 in high).
LEGEND_ROWS = 18
# Under the layers (zorder 1.5 < 2): a one-layer-dominated total would hide that layer.
TOTAL_STYLE = {"color": "black", "linestyle": ":", "linewidth": 2.5, "zorder": 1.5}
ZERO_MARKERS_MAX = 30
ZERO_MARKER = {"marker": "v", "markersize": 6, "linestyle": "none", "clip_on": False}
ALERT_MARKER = {
    "marker": "o",
    "markersize": 9,
    "markeredgecolor": "black",
    "markeredgewidth": 1.5,
    "linestyle": "none",
    "zorder": 5,
}


# ------------------------------------------------------------------------------------------------
# Figures, colours, legends
# ------------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    """A figure with constrained layout, so that a legend placed "outside" gets its own room."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def series_styles(n: int) -> list[tuple[Any, str]]:
    """(colour, line style) for `n` series in depth order, no two alike."""
    from matplotlib import colormaps

    if n <= QUALITATIVE_MAX:
        tab10 = colormaps["tab10"]
        return [(tab10(i), "-") for i in range(n)]
    # viridis without its last tenth: its yellow end is hard to see on white.
    viridis = colormaps["viridis"]
    positions = np.linspace(0, 0.9, n)
    return [(viridis(x), "-" if i % 2 == 0 else "--") for i, x in enumerate(positions)]


def legend_outside(fig, handles: list, labels: list[str], keys: set[str] = frozenset()) -> None:
    """One legend for the whole figure, right of the axes, the figure widened to hold it; with
    a key to the zero and alert markers when `keys` says they were drawn."""
    from matplotlib.lines import Line2D

    handles, labels = list(handles), list(labels)
    if "zero" in keys:
        handles.append(Line2D([], [], color="grey", **ZERO_MARKER))
        labels.append("value 0 (off the log axis)")
    if "alert" in keys:
        handles.append(Line2D([], [], markerfacecolor="grey", **ALERT_MARKER))
        labels.append("alert (gradients.json)")
    if not handles:
        return
    columns = math.ceil(len(handles) / LEGEND_ROWS)
    legend = fig.legend(handles, labels, loc="outside right upper", fontsize="small", ncols=columns)
    # Constrained layout makes room for the legend by narrowing the axes; widening the figure
    # by the legend's width gives the axes their room back.
    legend_width = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    fig.set_size_inches(fig.get_figwidth() + legend_width + 0.1, fig.get_figheight())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ------------------------------------------------------------------------------------------------
# One series on a log axis: zeros on the bottom edge, alerts ringed
# ------------------------------------------------------------------------------------------------


def zero_note(steps: Sequence[int], values: Sequence[float]) -> str | None:
    """What a series' zeros say in its legend: `0 from step N` where it reaches exactly 0 and
    stays there, `0 at k steps from step N` where it leaves 0 again, None if it is never 0."""
    zeros = [i for i, v in enumerate(values) if v == 0]
    if not zeros:
        return None
    if all(v == 0 for v in values[zeros[0] :]):
        return f"0 from step {steps[zeros[0]]}"
    return f"0 at {len(zeros)} steps from step {steps[zeros[0]]}"


def alert_note(alerts: Sequence[AlertMark]) -> str | None:
    if not alerts:
        return None
    return "alert: " + "; ".join(f"{a.kind} at step {a.step}" for a in alerts)


def draw_log_series(
    ax,
    points: tuple[Sequence[int], Sequence[float]],
    label: str,
    color: Any,
    linestyle: str = "-",
    alerts: Sequence[AlertMark] = (),
    notes_in_label: bool = True,
    **line: Any,
) -> set[str]:
    """Draw one series on a log y axis: its positive values as a line, its zeros as triangles on
    the bottom edge, its alerts as ringed dots. The notes ("0 from step N", "alert: ...") go
    into the legend label, or, where the legend is shared by several axes, next to the marks.
    Returns the kinds of marks drawn ("zero", "alert") for the legend's key."""
    steps, values = list(points[0]), list(points[1])
    positive = [v if math.isfinite(v) and v > 0 else math.nan for v in values]
    zeros = zero_note(steps, values)
    alerted = alert_note(alerts)
    notes = [n for n in (zeros, alerted) if n]
    full_label = label + (f" ({'; '.join(notes)})" if notes and notes_in_label else "")
    ax.plot(steps, positive, linestyle=linestyle, color=color, label=full_label, **line)
    drawn = set()
    # x in data, y in axes coordinates: 0 is the bottom edge whatever the y limits end up being.
    on_bottom_edge = ax.get_xaxis_transform()
    if zeros:
        zero_steps = [s for s, v in zip(steps, values, strict=True) if v == 0]
        # A few dozen triangles say "0 here" along the edge; one per logged step is a smear.
        every = max(1, math.ceil(len(zero_steps) / ZERO_MARKERS_MAX))
        ax.plot(
            zero_steps,
            [0.0] * len(zero_steps),
            color=color,
            transform=on_bottom_edge,
            markevery=every,
            **ZERO_MARKER,
        )
        if not notes_in_label:
            ax.annotate(
                zeros,
                (zero_steps[0], 0.0),
                xycoords=on_bottom_edge,
                xytext=(3, 4),
                textcoords="offset points",
                fontsize="x-small",
                color=color,
            )
        drawn.add("zero")
    for alert in alerts:
        if not steps:
            break
        # An alert fires on a logging step, so its step is one of the series'; else the nearest.
        i = int(np.argmin([abs(s - alert.step) for s in steps]))
        if positive[i] == positive[i]:  # not NaN: on the line
            ax.plot([steps[i]], [positive[i]], markerfacecolor=color, **ALERT_MARKER)
            where, coords = (steps[i], positive[i]), "data"
        else:  # a zero or non-finite value: on the bottom edge, as the zeros are
            ax.plot(
                [steps[i]],
                [0.0],
                markerfacecolor=color,
                transform=on_bottom_edge,
                clip_on=False,
                **ALERT_MARKER,
            )
            where, coords = (steps[i], 0.0), on_bottom_edge
        if not notes_in_label:
            ax.annotate(
                alert.kind,
                where,
                xycoords=coords,
                xytext=(6, 6),
                textcoords="offset points",
                fontsize="x-small",
            )
        drawn.add("alert")
    return drawn


def _log_axes(ax, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


# ------------------------------------------------------------------------------------------------
# The report's plots
# ------------------------------------------------------------------------------------------------


def loss_figure(runs: list[Run]):
    """Every run's loss curves on one axis (log scale unless a loss goes negative)."""
    if not any(loss_tags(r) for r in runs):
        return None
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    tag_styles = ["-", "--", ":", "-."]
    log = all(v >= 0 for r in runs for t in loss_tags(r) for v in r.scalars[t][1])
    keys: set[str] = set()
    for run, (color, _) in zip(runs, series_styles(len(runs)), strict=True):
        for i, tag in enumerate(loss_tags(run)):
            label = tag if len(runs) == 1 else f"{run.label} {tag}"
            style = tag_styles[i % len(tag_styles)]
            if log:
                keys |= draw_log_series(ax, run.scalars[tag], label, color, style)
            else:
                ax.plot(*run.scalars[tag], linestyle=style, color=color, label=label)
    if log:
        _log_axes(ax, "loss")
    else:
        ax.set(xlabel="step", ylabel="loss")
        ax.grid(True, alpha=0.3)
    ax.set_title("Loss")
    legend_outside(fig, *ax.get_legend_handles_labels(), keys)
    return fig


def _series_with_total(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    series = layer_series(run)
    if "grad_norm/total" in run.scalars:
        series["total"] = run.scalars["grad_norm/total"]
    return series


def draw_layers(
    ax, series: dict[str, tuple[list[int], list[float]]], alerts: Sequence[AlertMark] = ()
) -> set[str]:
    """Every layer's series on one log axis, a colour each in depth order; totals dotted black."""
    layers = [lay for lay in series if not lay.startswith("total")]
    keys: set[str] = set()
    for lay, (color, style) in zip(layers, series_styles(len(layers)), strict=True):
        marks = [a for a in alerts if lay in a.layers]
        keys |= draw_log_series(ax, series[lay], lay, color, style, marks)
    for key in (k for k in series if k.startswith("total")):
        marks = [a for a in alerts if not a.layers] if key == "total" else []
        keys |= draw_log_series(ax, series[key], key, alerts=marks, **TOTAL_STYLE)
    _log_axes(ax, "gradient L2 norm")
    return keys


def grad_norms_figure(runs: list[Run]):
    """One run: every layer on one axis. Several: one panel per layer, the runs overlaid."""
    series = {id(r): _series_with_total(r) for r in runs}
    layers = list(dict.fromkeys(lay for s in series.values() for lay in s))
    if not layers:
        return None
    if len(runs) == 1:
        fig = new_figure(8, 4.5)
        ax = fig.add_subplot()
        keys = draw_layers(ax, series[id(runs[0])], runs[0].alert_marks)
        ax.set_title("Gradient L2 norm per layer")
        legend_outside(fig, *ax.get_legend_handles_labels(), keys)
        return fig
    ncols = min(2, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = new_figure(6 * ncols, 3.2 * nrows)
    keys = set()
    styles = series_styles(len(runs))
    for i, lay in enumerate(layers):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, (color, style) in zip(runs, styles, strict=True):
            if lay in series[id(run)]:
                points, marks = series[id(run)][lay], alerts_on(run, lay)
                keys |= draw_log_series(
                    ax, points, run.label, color, style, marks, notes_in_label=False
                )
        _log_axes(ax, "gradient L2 norm")
        ax.set_title(f"grad_norm/{lay}")
    # One legend for every panel: the runs, in the same colours in each.
    handles = [_line_handle(color, style) for color, style in styles]
    legend_outside(fig, handles, [r.label for r in runs], keys)
    return fig


def _line_handle(color: Any, linestyle: str = "-"):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=linestyle)


def grad_flow_bars_figure(runs: list[Run]):
    """Gradient flow: one bar per layer (mean norm over the run), whiskers from min to max;
    the bars of alerted layers hatched, a mean of exactly 0 a triangle on the bottom edge."""
    from matplotlib.patches import Patch

    tables = [{k: v for k, v in layer_table(r).items() if k != "total"} for r in runs]
    layers = list(dict.fromkeys(lay for t in tables for lay in t))
    if not layers:
        return None
    fig = new_figure(max(6, 0.8 * len(layers) * max(1, len(runs) / 2)), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    x = np.arange(len(layers))
    keys: set[str] = set()
    for i, (run, table, (color, _)) in enumerate(
        zip(runs, tables, series_styles(len(runs)), strict=True)
    ):
        rows = [table.get(lay) or {} for lay in layers]
        mean, low, high = (
            np.array([math.nan if r.get(k) is None else r[k] for r in rows])
            for k in ("mean", "min", "max")
        )
        pos = x - 0.4 + width * (i + 0.5)
        alerted = [bool(alerts_on(run, lay)) for lay in layers]
        bars = ax.bar(pos, np.where(mean > 0, mean, math.nan), width, color=color, label=run.label)
        for bar, hatched in zip(bars, alerted, strict=True):
            if hatched:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
                keys.add("hatch")
        # A whisker down to a minimum of 0 runs to the bottom edge (log axes clip it there).
        ax.errorbar(pos, mean, yerr=[mean - low, high - mean], fmt="none", ecolor="k", lw=1)
        zero = mean == 0
        if zero.any():
            ax.plot(
                pos[zero],
                np.zeros(zero.sum()),
                color=color,
                transform=ax.get_xaxis_transform(),
                **ZERO_MARKER,
            )
            keys.add("zero")
    ax.set_xticks(x, layers)
    ax.set_yscale("log")
    ax.set(xlabel="layer (input to output)", ylabel="gradient L2 norm (mean; min-max)")
    ax.set_title("Gradient flow per layer")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(runs) == 1:  # the bars' colour says nothing more than the title
        handles, labels = [], []
    if "hatch" in keys:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
        labels.append("layer alerted (gradients.json)")
    legend_outside(fig, handles, labels, keys)
    return fig


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


def histograms_figure(runs: list[Run], layer: str):
    """Histograms over time for one layer: a heatmap per run and per (kind, parameter); the
    steps of alerts on the layer as dashed lines."""

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
    fig = new_figure(3.6 * len(columns), 2.8 * len(runs) + 0.4)
    for i, run in enumerate(runs):
        for j, tag in enumerate(columns):
            ax = fig.add_subplot(len(runs), len(columns), i * len(columns) + j + 1)
            rows = run.histograms.get(tag)
            if not rows:
                ax.set_axis_off()
                continue
            steps, edges, grid = histogram_grid(rows)
            ax.pcolormesh(_cell_edges(steps), edges, np.log1p(grid.T), cmap="magma")
            for alert in alerts_on(run, layer):
                ax.axvline(alert.step, color="cyan", linestyle="--", linewidth=1)
                ax.annotate(
                    f"alert: {alert.kind}",
                    (alert.step, 1.0),
                    xytext=(2, -10),
                    xycoords=ax.get_xaxis_transform(),
                    textcoords="offset points",
                    fontsize="x-small",
                    color="cyan",
                )
            title = tag if len(runs) == 1 else f"{run.label}\n{tag}"
            ax.set_title(title, fontsize="small")
            ax.set_xlabel("step", fontsize="small")
            ax.tick_params(labelsize="x-small")
    fig.suptitle(
        f"Histograms over steps, layer {layer} (colour: log(1 + count))", fontsize="medium"
    )
    return fig


def histogram_file_name(layer: str) -> str:
    return f"hist_{_safe(layer)}.png"


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def tags_figure(runs: list[Run], tags: list[str]):
    """The `--tags` scalars: a panel per tag, the runs overlaid (linear axes: any values)."""
    if not tags:
        return None
    ncols = min(2, len(tags))
    nrows = math.ceil(len(tags) / ncols)
    fig = new_figure(6 * ncols, 3.2 * nrows)
    styles = series_styles(len(runs))
    for k, tag in enumerate(tags):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for run, (color, _) in zip(runs, styles, strict=True):
            if tag in run.scalars:
                ax.plot(*run.scalars[tag], color=color, label=run.label)
        ax.set(title=tag, xlabel="step")
        ax.grid(True, alpha=0.3)
    if len(runs) > 1:
        legend_outside(fig, [_line_handle(c) for c, _ in styles], [r.label for r in runs])
    return fig


# ------------------------------------------------------------------------------------------------
# The monitor's grad_flow.png
# ------------------------------------------------------------------------------------------------


def grad_flow_figure(history: dict[str, Any], alerts: Sequence[dict[str, Any]] = ()):
    """Every layer's gradient L2 norm over the steps from a monitor's history
    (:attr:`GradientMonitor.history`), the total dotted, log scale; `alerts` (the monitor's
    ``summary()["alerts"]``) ringed. None if nothing was logged."""
    steps = history["step"]
    if not steps:
        return None
    series = {lay: (steps, v) for lay, v in {**history["layers"], **history["totals"]}.items()}
    marks = [AlertMark(step=a["step"], kind=a["kind"], layers=list(a["layers"])) for a in alerts]
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    keys = draw_layers(ax, series, marks)
    ax.set_title("Gradient flow: per-layer gradient norms")
    legend_outside(fig, *ax.get_legend_handles_labels(), keys)
    return fig


def save_grad_flow(
    history: dict[str, Any], path: str | Path, alerts: Sequence[dict[str, Any]] = ()
) -> Path | None:
    """``grad_flow.png``: :func:`grad_flow_figure` saved to `path`; None if nothing was logged."""
    fig = grad_flow_figure(history, alerts)
    return None if fig is None else save_figure(fig, Path(path))
