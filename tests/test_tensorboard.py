"""A real TensorBoard server over gradwatch event files: its HTTP data API, then a headless browser.

Only 127.0.0.1 is contacted. The server is always stopped, its whole process group (TensorBoard
starts its Rust data server as a child).
"""

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from screenshot_tensorboard import CHROMIUM, TensorBoard, screenshot_grad_norms
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


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_browser_shows_gradient_charts(served_run, tmp_path):
    """Headless Chromium opens the scalars dashboard filtered to grad_norm/ and draws one chart
    per gradient-norm tag; the screenshot is a real image (GRADWATCH_SCREENSHOT keeps it)."""
    server, run, values = served_run
    grad_tags = {t for t in values if t.startswith("grad_norm/")}
    wait_until_loaded(server, run, hist_tags(), values)
    shot = Path(os.environ.get("GRADWATCH_SCREENSHOT", tmp_path / "tensorboard_grad_norms.png"))
    shown = screenshot_grad_norms(server.url, shot, expected_tags=grad_tags)
    assert sorted(shown) == sorted(grad_tags)  # the filter shows these and nothing else
    check_png(shot)


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
