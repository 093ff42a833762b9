"""The page `make tensorboard` opens on: TensorBoard's Custom Scalars dashboard, laid out by
gradwatch so that a run's story is on the first screen.

TensorBoard's default page (Time Series) gives every tag its own card, sorts the groups by name
(`epoch` and `final`, one dot each, come first) and draws each card on a linear axis: per-layer
gradient norms from 1e-9 to 1e-1 look like one curve at 0. The Custom Scalars dashboard draws
the charts that a layout names, several tags on one chart, in the layout's order. Every run
writes the same layout (TensorBoard merges the runs' layouts, dropping duplicates):

1. the loss of every run (`train/loss`, `val/loss`, or any tag ending in `loss`);
2. every layer's gradient norm on one chart, as log10: a chart's axis cannot be made logarithmic
   by default, so TensorBoard gets `grad_norm_log10/<layer>` next to `grad_norm/<layer>`;
3. every layer's update ratio (the step's change over the weights' norm), as log10 too.
4. in a run with 16-bit weights (``bf16-true``, ``16-true``) only, every layer's share of updates
   rounded away (``update_rounded_away/<layer>``): there an update ratio that looks healthy can
   come from the few values that still move. TensorBoard appends it to the other runs' charts.

A layer whose norm or ratio is exactly 0 (or not finite) has no point on a log10 chart: its
`grad_norm/<layer>` carries the value. The log10 copies go to TensorBoard only; other loggers
get the plain values.
"""

import math

from lightning.pytorch.loggers import TensorBoardLogger

# Where `make tensorboard` points: the Custom Scalars tab, the lines as logged (no smoothing: a
# one-step spike should look like one).
URL_FRAGMENT = "#custom_scalars&_smoothingWeight=0"

GRAD_NORM_LOG10 = "grad_norm_log10"
UPDATE_RATIO_LOG10 = "update_ratio_log10"

# TensorBoard matches these from the tag's start (`re.match`). `final/train_loss` is a run's
# last value for HParams (one dot): not a curve.
LOSS_TAGS = r"(?!final/)(.*[/_])?loss$"

LAYOUT = {
    "gradwatch": {
        "loss": ["Multiline", [LOSS_TAGS]],
        "gradient norm per layer, log10": ["Multiline", [rf"{GRAD_NORM_LOG10}/"]],
        "update ratio per layer (step / weights), log10": [
            "Multiline",
            [rf"{UPDATE_RATIO_LOG10}/"],
        ],
    }
}


ROUNDED_AWAY_CHART = {
    "updates rounded away per layer (16-bit weights)": ["Multiline", [r"update_rounded_away/"]]
}


def layout(rounded_away: bool) -> dict[str, dict[str, list]]:
    """The layout: ``LAYOUT``, and the chart of rounded-away updates where the run writes them."""
    if not rounded_away:
        return LAYOUT
    return {"gradwatch": {**LAYOUT["gradwatch"], **ROUNDED_AWAY_CHART}}


def write_layout(logger: TensorBoardLogger, rounded_away: bool) -> None:
    """The layout into the run's event file, once per fit (a resumed run writes the same one)."""
    logger.experiment.add_custom_scalars(layout(rounded_away))


def log10_scalars(
    layer_norms: dict[str, float], update_ratios: dict[str, float]
) -> dict[str, float]:
    """The charts' values: log10 of each layer's gradient norm and update ratio, by layer tag;
    zero and non-finite values left out."""
    out = {}
    for family, values in ((GRAD_NORM_LOG10, layer_norms), (UPDATE_RATIO_LOG10, update_ratios)):
        for tag, value in values.items():
            if value > 0 and math.isfinite(value):
                out[f"{family}/{tag}"] = math.log10(value)
    return out
