"""The page `make tensorboard` opens on: the Custom Scalars layout every run writes, and the log10
copies of the per-layer norms and update ratios it charts, recomputed from the weights."""

import math
import re

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from test_monitor import X_XOR, Y_XOR, fit, plain_sgd_fit, read_events, scalars, xor_loader

from gradwatch.monitor import GradientMonitor
from gradwatch.monitor.first_screen import LAYOUT, log10_scalars

LAYOUT_TAG = "custom_scalars__config__"  # where TensorBoard's Custom Scalars plugin looks


def written_layout(acc) -> dict[str, dict[str, list[str]]]:
    """{category: {chart title: [tag regexes]}} as the run's event file holds it."""
    [event] = acc.Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return {
        c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart}
        for c in layout.category
    }


def charted(regexes: list[str], tags: list[str]) -> set[str]:
    """The tags a chart draws: TensorBoard matches each regex from the tag's start."""
    return {t for t in tags if any(re.match(r, t) for r in regexes)}


def test_log10_values_equal_log10_of_norms_recomputed_from_sgd_steps(tmp_path):
    """For SGD without momentum g_k = (w_k - w_{k+1}) / lr: each layer's gradient norm and
    update ratio recomputed from the weights, then log10."""
    lr = 0.5
    trainer, w = plain_sgd_fit(tmp_path, GradientMonitor(), lr, 4)
    values = scalars(read_events(trainer.logger.log_dir))
    for k in range(4):
        for layer in ("fc1", "fc2"):
            names = (f"{layer}.weight", f"{layer}.bias")
            g = torch.cat([((w[k][n] - w[k + 1][n]) / lr).flatten() for n in names])
            before = torch.cat([w[k][n].flatten() for n in names])
            ratio = (lr * g).norm() / before.norm()
            assert values[f"grad_norm_log10/{layer}"][k] == pytest.approx(
                math.log10(g.norm().item()), abs=1e-5
            )
            assert values[f"update_ratio_log10/{layer}"][k] == pytest.approx(
                math.log10(ratio.item()), abs=1e-5
            )


def test_every_run_writes_the_layout_and_its_charts_draw_the_runs_tags(tmp_path):
    trainer, _ = fit(tmp_path, GradientMonitor(), max_epochs=3)
    acc = read_events(trainer.logger.log_dir)
    layout = written_layout(acc)
    assert layout == {c: {t: spec[1] for t, spec in charts.items()} for c, charts in LAYOUT.items()}
    [charts] = layout.values()
    loss, grad_norms, update_ratios = charts.values()  # in this order on the page
    tags = acc.Tags()["scalars"]
    assert charted(loss, tags) == {"train/loss"}
    assert charted(grad_norms, tags) == {"grad_norm_log10/fc1", "grad_norm_log10/fc2"}
    assert charted(update_ratios, tags) == {"update_ratio_log10/fc1", "update_ratio_log10/fc2"}


def test_a_run_with_16_bit_weights_charts_its_rounded_away_updates_too(tmp_path):
    """bf16-true: a fourth chart, after the other three, drawing every layer's share of updates
    rounded away; TensorBoard appends it to a float32 run's three when both are open."""
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(),
        loader=xor_loader(x=X_XOR.bfloat16(), y=Y_XOR.bfloat16()),
        precision="bf16-true",
        max_epochs=3,
    )
    acc = read_events(trainer.logger.log_dir)
    [charts] = written_layout(acc).values()
    assert list(charts)[:3] == list(LAYOUT["gradwatch"])
    [(title, rounded_away)] = list(charts.items())[3:]
    assert title == "updates rounded away per layer (16-bit weights)"
    tags = acc.Tags()["scalars"]
    assert charted(rounded_away, tags) == {"update_rounded_away/fc1", "update_rounded_away/fc2"}


@pytest.mark.parametrize(
    ("tag", "drawn"),
    [
        ("train/loss", True),
        ("val/loss", True),
        ("loss", True),
        ("train_loss", True),
        ("final/train_loss", False),  # one dot per run, for HParams
        ("gloss", False),
        ("train/loss_scale", False),
    ],
)
def test_the_loss_chart_draws_loss_curves_only(tag, drawn):
    [loss_chart] = [spec[1] for spec in LAYOUT["gradwatch"].values()][:1]
    assert bool(charted(loss_chart, [tag])) is drawn


def test_zero_and_nonfinite_values_have_no_log10_point():
    got = log10_scalars(
        {"fc1": 0.0, "fc2": float("nan"), "fc3": 1e-9, "fc4": float("inf")},
        {"fc1": 0.0, "fc3": 1e-3},
    )
    assert got == pytest.approx({"grad_norm_log10/fc3": -9.0, "update_ratio_log10/fc3": -3.0})


def test_only_tensorboard_gets_the_log10_copies(tmp_path):
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    trainer, _ = fit(tmp_path, GradientMonitor(), logger=loggers, max_epochs=2)
    tb_tags = read_events(loggers[0].log_dir).Tags()["scalars"]
    assert "grad_norm_log10/fc1" in tb_tags
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "grad_norm/fc1" in header
    assert "log10" not in header
