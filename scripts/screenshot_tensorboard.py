"""Serve a log directory with TensorBoard on 127.0.0.1 and screenshot its gradient-norm charts.

    python scripts/screenshot_tensorboard.py outputs docs/img/tensorboard_grad_norms.png

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
from pathlib import Path

CHROMIUM = Path(os.environ.get("GRADWATCH_CHROMIUM", "/usr/bin/chromium"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """`tensorboard --logdir logdir` on a free local port, in its own process group."""

    def __init__(self, logdir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        # Its own process group: TensorBoard starts its Rust data server as a child, and stop()
        # must reach that one too.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--reload_interval", "1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

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


def screenshot_grad_norms(
    url: str,
    path: Path,
    expected_tags: set[str],
    tag_filter: str = "grad_norm/",
    log_scale: bool = True,
    timeout_s: float = 60,
    chromium: Path = CHROMIUM,
) -> list[str]:
    """Open the scalars dashboard filtered to `tag_filter` (a regex), wait until there is a chart
    for every one of `expected_tags`, set the charts' y axes to log scale and save a screenshot.
    Returns the tags of the charts the filter shows."""
    from playwright.sync_api import sync_playwright

    pattern = re.compile(tag_filter)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            query = urllib.parse.quote(tag_filter, safe="/")
            page.goto(
                f"{url}/?darkMode=false#scalars&tagFilter={query}&_smoothingWeight=0",
                timeout=timeout_s * 1000,
            )
            # Playwright's CSS selectors pierce TensorBoard's shadow DOM. The matching charts come
            # first; every other section follows below them.
            cards = page.locator("tf-scalar-card")
            deadline = time.monotonic() + timeout_s
            while True:
                tags = [t for t in cards.evaluate_all("cs => cs.map(c => c.tag)") if t]
                # A tag's chart may show twice: in the filter's results and in its own section.
                shown = list(dict.fromkeys(t for t in tags if pattern.search(t)))
                if expected_tags <= set(shown):
                    break
                if time.monotonic() > deadline:
                    missing = sorted(expected_tags - set(shown))
                    raise TimeoutError(f"no chart for {missing} after {timeout_s}s")
                page.wait_for_timeout(250)
            if log_scale:
                for i in range(len(shown)):
                    cards.nth(i).locator('[title="Toggle y-axis log scale"]').click()
                # Clicking scrolls the dashboard down: back to the top.
                cards.first.scroll_into_view_if_needed()
                page.locator("tf-tag-filterer").first.scroll_into_view_if_needed()
            page.wait_for_timeout(2000)  # the charts draw asynchronously after their data arrives
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path))
            return shown
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a run directory or a folder of runs")
    parser.add_argument("png", type=Path, help="where to save the screenshot")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM)
    parser.add_argument("--tag-filter", default="grad_norm/", help="regex, as in the search box")
    args = parser.parse_args(argv)
    server = TensorBoard(args.logdir, Path(f"/tmp/tensorboard_{os.getpid()}.log"))
    try:
        server.wait_for_tags(None, {"grad_norm/total"})
        tags = {t for tags in server.get("/data/plugin/scalars/tags").values() for t in tags}
        wanted = {t for t in tags if re.search(args.tag_filter, t)}
        shown = screenshot_grad_norms(
            server.url, args.png, wanted, tag_filter=args.tag_filter, chromium=args.chromium
        )
        print(f"{args.png}: {len(shown)} charts: {' '.join(shown)}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
