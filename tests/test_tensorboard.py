"""A real TensorBoard server over gradwatch event files: its HTTP data API, then a headless browser.

Only 127.0.0.1 is contacted. The server is always stopped, its whole process group (TensorBoard
starts its Rust data server as a child).
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from screenshot_tensorboard import CHROMIUM, TensorBoard, first_screen
from test_report import (
    HIST_STEPS,
    PARAMS,
    STEPS,
    check_png,
    f32,
    fixture_hist,
    write_fixture_run,
)

STARTUP_S = 60


def wait_until_loaded(server: TensorBoard, run: str, hist: set[str], values: dict) -> None:
    """Bounded poll: every scalar and histogram tag, and the last loss point, are served."""
    grad_tags = {t for t in values if t.startswith("grad_norm/")}
    try:
        server.wait_for_tags(run, {"train/loss", *grad_tags}, timeout_s=STARTUP_S)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            hists = server.get("/data/plugin/histograms/tags").get(run, {})
            loss = server.get("/data/plugin/scalars/scalars", run=run, tag="train/loss")
            if hist <= hists.keys() and loss and loss[-1][1] == STEPS[-1]:
                return
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as error:
        pytest.fail(f"{error}\n{server.output()}")
    pytest.fail(f"histograms not served after {STARTUP_S}s\n{server.output()}")


@pytest.fixture
def served_run(tmp_path) -> Iterator[tuple[TensorBoard, str, dict]]:
    """A fresh run under outputs/xor/, served the way `make tensorboard` serves outputs/."""
    outputs = tmp_path / "outputs"
    run_dir = outputs / "xor" / "2026-01-01_00-00-00_000000_1"
    values = write_fixture_run(run_dir, seed=1)
    server = TensorBoard(outputs, tmp_path / "tensorboard.log")
    try:
        yield server, "xor/" + run_dir.name, values
    finally:
        server.stop()


def hist_tags() -> set[str]:
    """Every histogram tag the fixture writes."""
    return {
        f"{k}_hist/{lay}.{p}" for lay, ps in PARAMS.items() for p in ps for k in ("grad", "weight")
    }


def test_tensorboard_serves_loss_grad_norms_and_histograms(served_run):
    server, run, values = served_run
    grad_tags = {t for t in values if t.startswith("grad_norm/")}
    assert len(grad_tags) == 7  # 4 parameters, 2 layers, total
    wait_until_loaded(server, run, hist_tags(), values)
    assert run in server.get("/data/runs")

    for tag in ("train/loss", *sorted(grad_tags)):
        served = server.get("/data/plugin/scalars/scalars", run=run, tag=tag)
        assert [step for _, step, _ in served] == STEPS, tag
        assert [value for _, _, value in served] == [f32(values[tag][s]) for s in STEPS], tag

    for tag in sorted(hist_tags()):
        kind, name = tag.split("_hist/")
        layer, param = name.split(".")
        served = server.get("/data/plugin/histograms/histograms", run=run, tag=tag)
        assert [step for _, step, _ in served] == HIST_STEPS, tag
        for (_, step, buckets), expected_step in zip(served, HIST_STEPS, strict=True):
            lo, hi, limits, counts = fixture_hist(layer, param, expected_step, kind)
            lefts = [lo, *limits[:-1]]
            written = [(a, b, c) for a, b, c in zip(lefts, limits, counts, strict=True) if c > 0]
            # TensorBoard may drop empty end buckets; the non-empty ones must come back as written.
            got = [(a, b, c) for a, b, c in buckets if c > 0]
            assert [c for *_, c in got] == [c for *_, c in written], (tag, step)
            edges = [x for a, b, _ in written for x in (a, b)]
            assert [x for a, b, _ in got for x in (a, b)] == pytest.approx(edges, rel=1e-12)
            assert min(a for a, _, _ in buckets) == pytest.approx(lo)
            assert max(b for _, b, _ in buckets) == pytest.approx(hi)


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no browser at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


def train(outputs: Path, *overrides: str) -> None:
    """One real run, as `make train <overrides>` starts it."""
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.train", f"paths.root={outputs}", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


LOSS, GRAD_NORMS, UPDATE_RATIOS = (
    "loss",
    "gradient norm per layer, log10",
    "update ratio per layer (step / weights), log10",
)


@pytest.fixture
def screen(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Where the page's runs go (`outputs`, as the page shows it after `make tensorboard`) and
    its screenshots (GRADWATCH_SCREENSHOTS=<dir> keeps them: the README's images)."""
    shots = Path(os.environ.get("GRADWATCH_SCREENSHOTS", tmp_path)).absolute()
    monkeypatch.chdir(tmp_path)
    return Path("outputs"), shots


@contextmanager
def serving(outputs: Path) -> Iterator[TensorBoard]:
    """TensorBoard over ``outputs``, as `make tensorboard` serves it; a failure to serve or to
    draw fails the test with the server's output; always stopped."""
    server = TensorBoard(outputs, Path("tensorboard.log").absolute())
    try:
        yield server
    except (RuntimeError, TimeoutError) as error:
        pytest.fail(f"{error}\n{server.output()}")
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_the_printed_page_tells_the_story_on_its_first_screen(screen):
    """Three real runs, served as `make tensorboard` serves them; the page it prints, opened
    at 1280x800 without a click: the loss and the per-layer gradient norms are in view, SGD's
    and Adam's lines drawn under names that tell them apart, the vanishing run's eleven layers
    on one chart."""
    outputs, shots = screen
    train(outputs)
    train(outputs, "optimizer=adam", "optimizer.lr=0.05")
    train(outputs, "experiment=vanishing")
    with serving(outputs) as server:
        runs = {server.wait_for_tags(run, {"grad_norm/total"}) for run in _run_names(outputs)}
        assert len(runs) == 3
        page = server.page()
        assert page.startswith(server.url)
        charts = first_screen(
            page, shots / "tensorboard_first_screen.png", {LOSS: 4, GRAD_NORMS: 2 + 2 + 11}
        )
        vanishing = first_screen(
            page, shots / "tensorboard_vanishing.png", {GRAD_NORMS: 11}, runs="vanishing"
        )

    by_title = {c.title: c for c in charts}
    assert [c.title for c in charts] == [LOSS, GRAD_NORMS, UPDATE_RATIOS]
    for title in (LOSS, GRAD_NORMS):
        assert by_title[title].in_view(1280, 800), by_title[title]
    # SGD's run is named by its time alone, Adam's by what its command line changed.
    xor_losses = [s for s in by_title[LOSS].series if s.startswith("train/loss (xor/")]
    assert len(xor_losses) == 2
    assert sum("optimizer=adam" in s for s in xor_losses) == 1
    assert by_title[LOSS].lines_drawn == len(by_title[LOSS].series) == 4  # + vanishing's train, val
    [vanishing_run] = [r for r in runs if r.startswith("vanishing/")]
    layers = {f"grad_norm_log10/fc{i} ({vanishing_run})" for i in range(1, 12)}
    assert layers <= set(by_title[GRAD_NORMS].series)
    assert by_title[GRAD_NORMS].lines_drawn == 15
    [alone] = [c for c in vanishing if c.title == GRAD_NORMS]
    assert set(alone.series) == layers and alone.lines_drawn == 11
    for png in ("tensorboard_first_screen.png", "tensorboard_vanishing.png"):
        check_png(shots / png)


ROUNDED_AWAY = "updates rounded away per layer (16-bit weights)"
# The README's bf16 example: Adam at 1e-4 in bfloat16 weights, most of its steps rounded away.
BF16_RUN = (
    "data=moons",
    "model.loss=bce_with_logits",
    "model.activation=relu",
    "model.layer_sizes=[2,32,32,1]",
    "optimizer=adam",
    "optimizer.lr=1e-4",
    "trainer.precision=bf16-true",
    "trainer.max_epochs=300",
)


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_a_bf16_run_shows_its_rounded_away_updates_on_the_first_screen(screen):
    """A run in bfloat16 weights: a fourth chart on the first screen, after the other three, with
    each layer's share of updates rounded away, most of them here."""
    outputs, shots = screen
    train(outputs, *BF16_RUN)
    with serving(outputs) as server:
        [run] = _run_names(outputs)
        server.wait_for_tags(run, {"update_rounded_away/fc1"})
        charts = first_screen(server.page(), shots / "tensorboard_bf16.png", {ROUNDED_AWAY: 3})
    assert [c.title for c in charts] == [LOSS, GRAD_NORMS, UPDATE_RATIOS, ROUNDED_AWAY]
    rounded_away = charts[3]
    assert rounded_away.lines_drawn == 3 and rounded_away.in_view(1280, 800), rounded_away
    check_png(shots / "tensorboard_bf16.png")


def _run_names(outputs: Path) -> list[str]:
    """TensorBoard's run names: each run directory relative to the served folder."""
    return [str(p.parent.relative_to(outputs)) for p in outputs.glob("*/*/events.out.tfevents.*")]


def test_make_tensorboard_binds_to_localhost_unless_asked():
    """`make tensorboard` serves on 127.0.0.1 only; HOST= opens it up on purpose."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    root = Path(__file__).resolve().parents[1]

    def command(*args: str) -> str:
        done = subprocess.run(
            ["make", "-n", "tensorboard", *args], capture_output=True, text=True, cwd=root, env=env
        )
        return done.stdout.strip().splitlines()[-1]

    assert "--logdir outputs --host 127.0.0.1 --port 6006" in command()
    assert "--host 0.0.0.0 --port 6007" in command("HOST=0.0.0.0", "PORT=6007")
