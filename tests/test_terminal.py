"""The console in a real terminal: `python -m gradwatch.train` in a pseudo-terminal, its bytes
played into a terminal emulator, and the final screen read as a person would see it.

The progress bar is drawn only on a terminal, so only a pseudo-terminal shows whether lines
printed while it is up (alerts, `Final:`, the per-layer table) tear it or are torn by it.
"""

import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pexpect = pytest.importorskip("pexpect")
pyte = pytest.importorskip("pyte")

COLUMNS, ROWS = 120, 40
# Long enough for the tutorial's stall alert (step 599) and three `Epoch 500` lines.
EPOCHS = 1500


def run_in_terminal(tmp_path: Path, *overrides: str) -> tuple[list[str], int]:
    """The screen's lines after the run has ended (trailing blanks cut), and the exit status."""
    env = {**os.environ, "COLUMNS": str(COLUMNS), "LINES": str(ROWS), "TERM": "xterm"}
    env.pop("HYDRA_FULL_ERROR", None)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gradwatch.train", f"paths.root={tmp_path}", *overrides],
        cwd=str(ROOT),
        env=env,
        dimensions=(ROWS, COLUMNS),
        timeout=120,
    )
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    while True:
        try:
            stream.feed(child.read_nonblocking(65536, timeout=120))
        except pexpect.EOF:
            break
    child.close()
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return lines, child.exitstatus


def test_lines_print_above_the_bar_and_the_bar_goes(tmp_path: Path) -> None:
    lines, status = run_in_terminal(tmp_path, f"trainer.max_epochs={EPOCHS}")
    screen = "\n".join(lines)
    assert status == 0, screen

    alerts = [i for i, line in enumerate(lines) if "ALERT" in line]
    assert len(alerts) == 1, screen
    # Whole, from column 0: not `A` on one line and `LERT ...` on the next, nor after a bar. It
    # is longer than a row: the terminal wraps it onto the next one.
    alert = lines[alerts[0]]
    if len(alert) == COLUMNS:
        alert += lines[alerts[0] + 1]
    assert alert.startswith("ALERT GradientMonitor: training has stalled at step 599: "), screen
    assert alert.endswith("the learning rate looks too small"), screen

    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert [e.split(",")[0] for e in epochs] == ["Epoch 500", "Epoch 1000", "Epoch 1500"], screen
    assert any(line.startswith("Final: train/loss ") for line in lines), screen
    assert any(line.startswith("layer ") for line in lines), screen
    assert any(line.startswith("Gradients of the first layer weights") for line in lines), screen
    assert lines[-1].endswith("]])"), screen  # the gradient tensor is the last thing printed

    # No bar left anywhere: tqdm's rate, its `|####|` or its `n/total`.
    for line in lines:
        assert "it/s" not in line and "batch/s" not in line and "s/batch" not in line, screen
        assert "|" not in line and f"/{EPOCHS}" not in line, screen
