"""The console in a real terminal: `python -m gradwatch.train` in a pseudo-terminal, its bytes
played into a terminal emulator, and the final screen read as a person would see it.

The progress bar is drawn only on a terminal, so only a pseudo-terminal shows whether lines
printed while it is up (alerts, `Final:`, the per-layer table) tear it or are torn by it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
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
    row = alerts[0]
    alert = lines[row]
    while len(lines[row]) == COLUMNS:  # a full row: the line goes on in the next one
        row += 1
        alert += lines[row]
    assert alert.startswith("ALERT GradientMonitor: training has stalled at step 599: "), screen
    assert "the learning rate looks too small [stall]. Fix: raise the learning rate" in alert
    assert alert.endswith("or use an adaptive optimizer such as Adam"), screen

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


# --- no noise: Hydra's report of a typo, TensorBoard's start -----------------------------------


def run_command(*args: str, timeout: float = 120) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "optimizer=adamm",
            "Unknown option optimizer=adamm. Options in 'optimizer': adam, adamw, rmsprop, sgd",
        ),
        (
            "trainer.max_epoch=3",
            "Could not override 'trainer.max_epoch': Key 'max_epoch' is not "
            "in struct. Did you mean 'trainer.max_epochs'?",
        ),
    ],
)
def test_a_typo_is_reported_in_one_line(tmp_path: Path, override: str, expected: str) -> None:
    code, out = run_command("-m", "gradwatch.train", override, f"paths.root={tmp_path}")
    assert code == 1, out
    assert out.splitlines() == [expected], out  # no search path dump, no HYDRA_FULL_ERROR hint
    assert not any(tmp_path.iterdir())


def test_tensorboard_starts_with_only_its_address(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwatch.board", "--logdir", str(tmp_path)]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its data server is a child: stop the whole group
    )
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("TensorBoard" in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
    assert [x for x in lines if x] == [
        f"TensorBoard {tensorboard_version()} at http://127.0.0.1:{port}/"
        "#custom_scalars&_smoothingWeight=0 (Press CTRL+C to quit)"
    ], lines


def tensorboard_version() -> str:
    from tensorboard.version import VERSION

    return VERSION
