"""Serve run directories the way `make tensorboard` does, open the page it prints in headless
Chromium at 1280x800, wait until gradwatch's charts are drawn and save a screenshot.

    python scripts/screenshot_tensorboard.py outputs docs/img/tensorboard_first_screen.png
    python scripts/screenshot_tensorboard.py outputs docs/img/x.png --runs vanishing

Needs Chromium (`apt-get install chromium`) and `pip install playwright`; Playwright drives the
system browser (`--chromium`, default /usr/bin/chromium), it downloads none.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path(os.environ.get("GRADWATCH_CHROMIUM", "/usr/bin/chromium"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """`make tensorboard`'s server (`python -m gradwatch.board`) over `logdir` on a free local
    port, in its own process group; `page()` is the address it prints."""

    def __init__(self, logdir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        # Its own process group: TensorBoard starts its Rust data server as a child, and stop()
        # must reach that one too.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradwatch.board", "--logdir", str(logdir)]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--reload_interval", "1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def page(self, timeout_s: float = 60) -> str:
        """The address in the server's one line: "TensorBoard 2.21.0 at <url> (Press CTRL+C...)"."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r" at (http://\S+) \(Press CTRL\+C", self.output())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"no address printed after {timeout_s}s: {self.output()}")

    def get(self, route: str, **params: str):
        """JSON from the server's data API, e.g. get("/data/plugin/scalars/tags")."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{route}{query}", timeout=10) as response:
            return json.loads(response.read())

    def wait_for_tags(self, run: str | None, scalar_tags: set[str], timeout_s: float = 60) -> str:
        """Poll until `run` (or any run, if None) serves `scalar_tags`; the run's name."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tensorboard exited with {self.proc.returncode}: {self.output()}"
                )
            try:
                for name, tags in self.get("/data/plugin/scalars/tags").items():
                    if (run is None or name == run) and scalar_tags <= tags.keys():
                        return name
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                last_error = error
            time.sleep(0.5)
        raise TimeoutError(
            f"tensorboard not serving {scalar_tags} after {timeout_s}s ({last_error})"
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


@dataclass
class Chart:
    """One chart of the page as drawn: its title, where it is, the lines it holds by name
    ("<tag> (<run>)") and how many of them are drawn."""

    title: str
    box: dict[str, float]  # x, y, width, height in the page's pixels
    series: list[str]
    lines_drawn: int

    def in_view(self, width: int, height: int) -> bool:
        b = self.box
        return (
            b["x"] >= 0
            and b["y"] >= 0
            and b["x"] + b["width"] <= width
            and (b["y"] + b["height"] <= height)
        )


VIEWPORT = {"width": 1280, "height": 800}


def first_screen(
    page_url: str,
    png: Path,
    expected_lines: dict[str, int],
    runs: str = "",
    timeout_s: float = 60,
    chromium: Path = CHROMIUM,
) -> list[Chart]:
    """Open `page_url` at 1280x800 without touching the page (`runs`: a regex in the run
    filter, as typed), wait until each chart titled in `expected_lines` draws at least that many
    lines, screenshot the viewport into `png` and return every chart of the page."""
    from playwright.sync_api import sync_playwright

    if runs:
        page_url += "&regexInput=" + urllib.parse.quote(runs)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(page_url, timeout=timeout_s * 1000)
            # Playwright's CSS selectors pierce TensorBoard's shadow DOM.
            cards = page.locator("tf-custom-scalar-multi-line-chart-card")
            deadline = time.monotonic() + timeout_s
            while True:
                charts = [_chart(cards.nth(i)) for i in range(cards.count())]
                drawn = {c.title: c.lines_drawn for c in charts}
                if all(drawn.get(t, 0) >= n for t, n in expected_lines.items()):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"charts drawn {drawn}, expected {expected_lines}")
                page.wait_for_timeout(250)
            page.wait_for_timeout(1000)  # the last lines' symbols draw after their paths
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png))
            return [_chart(cards.nth(i)) for i in range(cards.count())]
        finally:
            browser.close()


def _chart(card) -> Chart:
    title, series = card.evaluate("c => [c.title, Object.keys(c._nameToDataSeries || {})]")
    box = card.bounding_box() or {"x": -1, "y": -1, "width": 0, "height": 0}
    return Chart(title, box, series, card.locator("path.line").count())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a run directory or a folder of runs")
    parser.add_argument("png", type=Path, help="where to save the screenshot")
    parser.add_argument("--runs", default="", help="regex for the run filter, as typed")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM)
    args = parser.parse_args(argv)
    server = TensorBoard(args.logdir, Path(f"/tmp/tensorboard_{os.getpid()}.log"))
    try:
        server.wait_for_tags(None, {"grad_norm/total"})
        charts = first_screen(
            server.page(), args.png, {"loss": 1}, runs=args.runs, chromium=args.chromium
        )
        for c in charts:
            print(f"{c.title}: {c.lines_drawn} lines at y={c.box['y']:.0f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
