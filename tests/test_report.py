"""gradwatch-report against event files written here by hand, with values known in advance."""

import errno
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from gradwatch.report import histogram_grid, main, plain_text, save_grad_flow
from gradwatch.report_plots import (
    grad_flow_bars_figure,
    grad_flow_figure,
    grad_norms_figure,
    histograms_figure,
    loss_figure,
    series_styles,
    tags_figure,
    zero_note,
)
from gradwatch.report_runs import Problems, Run, label_runs, load_run

PARAMS = {"fc1": ("weight", "bias"), "fc2": ("weight", "bias")}
STEPS = list(range(0, 100, 10))
HIST_STEPS = [0, 50, 90]


def f32(x: float) -> float:
    """What an event file keeps of a float: float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def fixture_values(seed: int) -> dict[str, dict[int, float]]:
    """tag -> step -> value, the way the gradient monitor names them; fc1 shrinking (vanishing)."""
    values: dict[str, dict[int, float]] = {}
    for step in STEPS:
        t = step / 100
        values.setdefault("train/loss", {})[step] = 0.25 * math.exp(-seed * t) + 0.01
        values.setdefault("train/acc", {})[step] = min(1.0, 0.5 + seed * t / 2)
        layer_sq = {}
        for layer, params in PARAMS.items():
            base = (1e-4 if layer == "fc1" else 1e-2) * (1 + seed) * math.exp(-3 * t)
            sq = 0.0
            for k, p in enumerate(params):
                g = f32(base * (k + 1))
                w = f32(0.5 * (k + 1) + 0.1 * seed + t)
                values.setdefault(f"grad_norm/{layer}.{p}", {})[step] = g
                values.setdefault(f"weight_norm/{layer}.{p}", {})[step] = w
                sq += g * g
            layer_sq[layer] = sq
            values.setdefault(f"grad_norm/{layer}", {})[step] = f32(math.sqrt(sq))
            values.setdefault(f"update_ratio/{layer}", {})[step] = f32(1e-3 * (1 + seed) / (1 + t))
        values.setdefault("grad_norm/total", {})[step] = f32(math.sqrt(sum(layer_sq.values())))
    return values


def fixture_hist(layer: str, param: str, step: int, kind: str) -> tuple[float, float, list, list]:
    """A histogram as the monitor writes it: an empty bucket at min, then 8 equal buckets."""
    scale = (1e-4 if layer == "fc1" else 1e-2) if kind == "grad" else 1.0
    lo, hi = -scale * (1 + step / 100), scale * (2 + step / 100)
    width = (hi - lo) / 8
    limits = [lo, *(lo + width * (i + 1) for i in range(8))]
    counts = [0.0, *(float((i * 3 + step) % 5 + (param == "weight")) for i in range(8))]
    return lo, hi, limits, counts


ALERT = {"step": 50, "kind": "vanishing", "layers": ["fc1"], "message": "vanishing gradients"}


def write_fixture_run(
    run_dir: Path,
    seed: int = 1,
    overrides: list[str] | None = None,
    final: dict[str, float] | None = None,
    zero_from: int | None = None,
) -> dict:
    """A run directory with event files, overrides.yaml, hparams and gradients.json, as a
    gradwatch run has; `final`: the `final/*` tags of a finished run (RunSummary's);
    `zero_from`: train/loss and grad_norm/fc2 exactly 0 from that step on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    values = fixture_values(seed)
    if zero_from is not None:
        for tag in ("train/loss", "grad_norm/fc2"):
            values[tag].update({s: 0.0 for s in STEPS if s >= zero_from})
    writer = SummaryWriter(log_dir=str(run_dir))
    for step in STEPS:
        for tag, by_step in values.items():
            writer.add_scalar(tag, by_step[step], step)
        if step in HIST_STEPS:
            for layer, params in PARAMS.items():
                for p in params:
                    for kind in ("grad", "weight"):
                        lo, hi, limits, counts = fixture_hist(layer, p, step, kind)
                        writer.add_histogram_raw(
                            f"{kind}_hist/{layer}.{p}",
                            min=lo,
                            max=hi,
                            num=sum(counts),
                            sum=0.0,
                            sum_squares=1.0,
                            bucket_limits=limits,
                            bucket_counts=counts,
                            global_step=step,
                        )
    writer.add_text("alerts", "**vanishing**: vanishing gradients at step 50: `fc1`", 50)
    for key, value in (final or {}).items():
        writer.add_scalar("final/" + key.replace("/", "_"), value, STEPS[-1])
    # As Lightning's TensorBoardLogger.log_hyperparams does: into the run's own event file.
    for summary in hparams({"optimizer": "sgd", "lr": 0.01 * seed}, {"hp/final_loss": 0.0}):
        writer.file_writer.add_summary(summary)
    writer.close()
    overrides = overrides if overrides is not None else [f"seed={seed}", "paths.root=/tmp/x"]
    (run_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "gradients.json").write_text(json.dumps({"alerts": [ALERT]}))
    return values


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def check_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file(), f"missing {path}"
    width, height = png_size(path)
    assert width >= 300 and height >= 200
    assert path.stat().st_size >= min_bytes  # a blank figure is a few KB
    # Non-trivial: many distinct colours, not a blank canvas.
    from matplotlib.image import imread

    pixels = imread(path)[..., :3].reshape(-1, 3)
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 50


def test_tables_and_plots_match_written_values(tmp_path, capsys):
    run = tmp_path / "run"
    values = write_fixture_run(run, seed=1)
    assert main([str(run), "--tags", "train/acc"]) == 0
    out = capsys.readouterr().out
    data = json.loads((run / "report" / "report.json").read_text())
    (summary,) = data["runs"]

    for layer in (*PARAMS, "total"):
        series = [values[f"grad_norm/{layer}"][s] for s in STEPS]
        row = summary["layers"][layer]
        assert row["first"] == series[0]
        assert row["last"] == series[-1]
        assert row["min"] == min(series) and row["max"] == max(series)
        assert row["mean"] == pytest.approx(sum(series) / len(series), rel=1e-12)
        params = PARAMS[layer] if layer != "total" else None
        names = (
            [f"{layer}.{p}" for p in params]
            if params
            else [f"{lay}.{p}" for lay, ps in PARAMS.items() for p in ps]
        )
        expected_w = math.sqrt(sum(values[f"weight_norm/{n}"][STEPS[-1]] ** 2 for n in names))
        assert row["weight_norm"] == pytest.approx(expected_w, rel=1e-12)
        if layer != "total":
            assert row["update_ratio"] == values[f"update_ratio/{layer}"][STEPS[-1]]
        # The printed table carries the same numbers.
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [layer])
        assert f"{series[0]:.4e}" in line and f"{series[-1]:.4e}" in line
        assert f"{min(series):.4e}" in line and f"{max(series):.4e}" in line
    assert summary["final"]["train/loss"] == f32(values["train/loss"][STEPS[-1]])
    assert summary["tags"]["train/acc"] == f32(values["train/acc"][STEPS[-1]])
    assert summary["alerts"] == {"vanishing": 1}
    assert summary["hparams"] == {"optimizer": "sgd", "lr": pytest.approx(0.01)}
    # Alerts as plain text: TensorBoard's Markdown marks are not printed.
    assert "alert at step 50: vanishing: vanishing gradients at step 50: fc1\n" in out
    assert "*" not in out and "`" not in out
    # The hyperparameters as a table, every key of the one run, not a dict dump.
    assert (
        "Hyperparameters:\nhyperparameter  value\nlr              0.01\noptimizer       sgd\n"
        in out
    )

    names = {Path(p).name for p in data["plots"]}
    assert names == {
        "loss.png",
        "grad_norms.png",
        "grad_flow_bars.png",
        "hist_fc1.png",
        "hist_fc2.png",
        "scalars.png",
    }
    for name in names:
        check_png(run / "report" / name)


def test_histogram_grid_keeps_every_count():
    """Spreading buckets onto the plot's grid neither loses nor invents counts."""
    rows = []
    for step in HIST_STEPS:
        lo, hi, limits, counts = fixture_hist("fc1", "weight", step, "grad")
        left = [lo, *limits[:-1]]
        rows.append((step, left, limits, counts))
    rows.append(
        (95, [0.5, 0.5], [0.5, 0.5], [0.0, 7.0])
    )  # every value equal: one zero-width bucket
    steps, edges, grid = histogram_grid(rows, bins=40)
    assert steps.tolist() == [*HIST_STEPS, 95]
    assert edges[0] == pytest.approx(-1e-4 * 1.9) and edges[-1] == pytest.approx(0.5)
    for i, row in enumerate(rows):
        assert grid[i].sum() == pytest.approx(sum(row[3]))
    assert grid[-1, -1] == 7.0


def test_two_runs_overlay_and_sweep_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_fixture_run(sweep / "optimizer=sgd", seed=1, overrides=["optimizer=sgd", "seed=1"])
    # print_every changes only the console: not a label (nor a run folder's name).
    adam = ["optimizer=adam", "seed=1", "print_every=0"]
    write_fixture_run(sweep / "optimizer=adam", seed=3, overrides=adam)
    (sweep / "multirun.yaml").write_text("{}\n")
    out_dir = tmp_path / "cmp"
    assert main([str(sweep), "--out", str(out_dir), "--layers", "fc1"]) == 0
    out = capsys.readouterr().out
    data = json.loads((out_dir / "report.json").read_text())
    # Labels are the overrides that differ between the runs (seed=1 is common to both).
    assert [r["label"] for r in data["runs"]] == ["optimizer=adam", "optimizer=sgd"]
    assert "== optimizer=adam" in out and "== optimizer=sgd" in out
    final = {r["label"]: r["final"]["train/loss"] for r in data["runs"]}
    assert final["optimizer=sgd"] == f32(fixture_values(1)["train/loss"][STEPS[-1]])
    assert final["optimizer=adam"] == f32(fixture_values(3)["train/loss"][STEPS[-1]])
    names = {Path(p).name for p in data["plots"]}
    assert names == {"loss.png", "grad_norms.png", "grad_flow_bars.png", "hist_fc1.png"}
    for name in names:
        check_png(out_dir / name)

    # The same two runs given one by one: same labels, default output in their common parent.
    assert main([str(sweep / "optimizer=sgd"), str(sweep / "optimizer=adam")]) == 0
    assert (sweep / "report" / "grad_norms.png").is_file()


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_path_without_event_files_is_one_line_exit_2(tmp_path, capsys, make):
    path = tmp_path / "run"
    if make == "empty":
        (path / "checkpoints").mkdir(parents=True)
    elif make == "file":
        path.write_text("not a run")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradwatch-report: error:")
    assert str(path) in err


def test_unknown_layer_is_an_error(tmp_path, capsys):
    write_fixture_run(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--layers", "fc9"]) == 2
    err = capsys.readouterr().err
    assert "fc9" in err and "fc1 fc2" in err


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, never a traceback; exit 2 for arguments, 1 for unreadable data
# ------------------------------------------------------------------------------------------------


def one_line(err: str, kind: str = "error") -> str:
    """stderr holds one line of `kind` and no traceback; return it."""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"gradwatch-report: {kind}: "), err
    return err


def event_file(run: Path) -> Path:
    (path,) = run.glob("events.out.tfevents.*")
    return path


@pytest.fixture
def deny(monkeypatch):
    """`deny(path)`: chmod 000. Root ignores permissions, so there the calls the report makes
    fail as the kernel fails them for a user: listing a folder, opening a file below it,
    os.access."""
    denied: list[Path] = []

    def under(path) -> bool:
        path = Path(path)
        return any(path == d or d in path.parents for d in denied)

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    if os.geteuid() == 0:
        scandir, listdir, path_open, access = os.scandir, os.listdir, Path.open, os.access
        monkeypatch.setattr(os, "scandir", lambda p=".": refuse(p) if under(p) else scandir(p))
        monkeypatch.setattr(os, "listdir", lambda p=".": refuse(p) if under(p) else listdir(p))
        monkeypatch.setattr(
            Path, "open", lambda s, *a, **k: refuse(s) if under(s) else path_open(s, *a, **k)
        )
        monkeypatch.setattr(os, "access", lambda p, m, **k: not under(p) and access(p, m, **k))

    def chmod_000(path: Path) -> None:
        path.chmod(0)
        denied.append(path)

    yield chmod_000
    for path in denied:  # so that pytest can remove tmp_path
        path.chmod(0o755)


@pytest.mark.parametrize(
    "text",
    [b"a: [\n", b"a: 1\n", b"42\n", b"- seed=1\n- {a: b}\n", b"- seed=\xff\n"],
    ids=["bad-yaml", "mapping", "number", "item-not-a-string", "not-utf8"],
)
def test_bad_overrides_yaml_is_a_warning_and_the_folder_labels_the_run(tmp_path, capsys, text):
    run = tmp_path / "run"
    write_fixture_run(run)
    (run / "overrides.yaml").write_bytes(text)
    assert main([str(run)]) == 0
    err = one_line(capsys.readouterr().err, "warning")
    assert f"{run / 'overrides.yaml'}: " in err and "labelled by its folder" in err
    data = json.loads((run / "report" / "report.json").read_text())
    assert [r["label"] for r in data["runs"]] == [f"{tmp_path.name}/run"]
    assert data["warnings"] and not data["errors"]


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_out_that_cannot_be_a_folder_is_refused_and_nothing_written(tmp_path, capsys, where):
    run = tmp_path / "run"
    write_fixture_run(run)
    a_file = tmp_path / "taken"
    a_file.write_text("mine\n")
    out = a_file if where == "file" else a_file / "sub"
    assert main([str(run), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--out {out}: " in err and "--out must be a folder" in err
    assert a_file.read_text() == "mine\n"
    assert not (run / "report").exists()


def test_a_plot_that_cannot_be_written_is_exit_1(tmp_path, capsys):
    """Past the up-front check of --out, a write can still fail (a full disk; here a folder
    where the plot goes): the file is named, one line."""
    run = tmp_path / "run"
    write_fixture_run(run)
    (tmp_path / "out" / "loss.png").mkdir(parents=True)
    assert main([str(run), "--out", str(tmp_path / "out")]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'out' / 'loss.png'}: cannot write: " in err


def frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, data, its masked CRC."""
    from gradwatch.report_runs import _masked_crc32c

    head = struct.pack("<Q", len(data))
    crc = struct.pack("<I", _masked_crc32c(head)), struct.pack("<I", _masked_crc32c(data))
    return head + crc[0] + data + crc[1]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (np.random.default_rng(0).bytes(5000), "record 1 (byte 0) fails its checksum"),
        (b"", "empty, no events"),
        (frame(b"\xff\xff\xff\xff not a protobuf"), "record 1 (byte 0) is not a TensorBoard event"),
    ],
    ids=["random-bytes", "empty", "records-not-events"],
)
def test_unreadable_event_file_is_exit_1_and_nothing_written(tmp_path, capsys, content, says):
    run = tmp_path / "run"
    write_fixture_run(run)
    event_file(run).write_bytes(content)
    assert main([str(run)]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{event_file(run)}: " in err and says in err
    assert not (run / "report").exists()


@pytest.mark.parametrize("damage", ["cut", "flipped-byte"])
def test_damaged_event_file_reports_the_records_before_the_damage(tmp_path, capsys, damage):
    """TensorBoard stops silently at a cut record or a bad checksum; the report says so."""
    run = tmp_path / "run"
    write_fixture_run(run)
    data = bytearray(event_file(run).read_bytes())
    if damage == "cut":  # a run killed mid-write
        data = data[:-10]
    else:
        data[len(data) // 2] ^= 0xFF
    event_file(run).write_bytes(bytes(data))
    assert main([str(run)]) == 1
    err = one_line(capsys.readouterr().err)
    says = "is cut short" if damage == "cut" else "fails its checksum"
    assert f"{event_file(run)}: record " in err and says in err
    assert "the report shows the" in err
    data = json.loads((run / "report" / "report.json").read_text())
    assert len(data["runs"]) == 1 and data["errors"] == [err.split("error: ", 1)[1].strip()]
    if damage == "flipped-byte":  # the steps after the damage are gone
        assert data["runs"][0]["steps"][1] < STEPS[-1]


def test_one_unreadable_run_of_several_is_named_and_the_others_reported(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (1, 2, 3):
        write_fixture_run(sweep / f"seed={seed}", seed=seed, overrides=[f"seed={seed}"])
    event_file(sweep / "seed=2").write_bytes(b"garbage" * 100)
    assert main([str(sweep)]) == 1
    err = one_line(capsys.readouterr().err)
    assert str(event_file(sweep / "seed=2")) in err
    data = json.loads((sweep / "report" / "report.json").read_text())
    # Ranked: seed=3's loss is the lower.
    assert [r["label"] for r in data["runs"]] == ["seed=3", "seed=1"]


@pytest.mark.parametrize(
    ("what", "code"),
    [
        ("event-file", 1),
        ("run-folder", 1),
        ("sweep-job", 1),
        ("overrides", 0),
        ("out-folder", 2),
        ("out-below-locked", 2),
    ],
)
def test_permission_denied_is_one_line(tmp_path, capsys, deny, what, code):
    sweep = tmp_path / "sweep"
    run, other = sweep / "a", sweep / "b"
    write_fixture_run(run)
    write_fixture_run(other, seed=2)
    args = [str(run)]
    locked = {
        "event-file": event_file(run),
        "run-folder": run,
        "sweep-job": run,
        "overrides": run / "overrides.yaml",
        "out-folder": tmp_path / "out",
        "out-below-locked": tmp_path / "out",
    }[what]
    if what == "sweep-job":
        args = [str(sweep)]
    if what.startswith("out"):
        locked.mkdir()
        out = locked if what == "out-folder" else locked / "new"
        args += ["--out", str(out)]
    deny(locked)
    assert main(args) == code
    err = one_line(capsys.readouterr().err, "warning" if code == 0 else "error")
    if what.startswith("out"):
        assert f"--out {out}: {locked} is not writable" in err
        assert not (run / "report").exists()
    else:
        assert f"{locked}: cannot read: Permission denied" in err
    if what == "sweep-job":  # the readable job is still reported
        (summary,) = json.loads((sweep / "report" / "report.json").read_text())["runs"]
        assert summary["path"] == str(other)


def test_files_the_report_does_not_read_do_not_matter(tmp_path, capsys):
    run = tmp_path / "run"
    write_fixture_run(run)
    (run / "metrics.json").write_text("{not json")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 10)
    assert main([str(run)]) == 0
    assert capsys.readouterr().err == ""


def test_command_line_exit_status_and_stderr(tmp_path):
    """As a user runs it: no traceback, not even a logged one from TensorBoard's reader."""
    run = tmp_path / "run"
    write_fixture_run(run)
    event_file(run).write_bytes(b"\x00" * 100)
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.report", str(run)], capture_output=True, text=True
    )
    assert done.returncode == 1
    one_line(done.stderr)
    assert str(event_file(run)) in done.stderr and not (run / "report").exists()


# ------------------------------------------------------------------------------------------------
# What the report says: the ranked runs table, the hyperparameters, the alerts
# ------------------------------------------------------------------------------------------------


def printed_table(out: str, heading: str) -> list[list[str]]:
    """The rows (cells split at two or more spaces) of the table printed under `heading`."""
    lines = out.split(heading + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines]


def test_runs_table_is_ranked_and_numbered_as_sweep_results(tmp_path, capsys):
    """A real sweep: the report's runs table has sweep_results.md's order and numbers."""
    command = [sys.executable, "-m", "gradwatch.train", "-m", "optimizer=sgd,adam"]
    command += ["optimizer.lr=0.01,0.1", "trainer.max_epochs=50", "print_every=0"]
    command += ["name=t", f"paths.root={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (sweep,) = (tmp_path / "sweeps" / "t").iterdir()
    sweep_rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in (sweep / "sweep_results.md").read_text().splitlines()[2:]
    ]
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    data = json.loads((sweep / "report" / "report.json").read_text())
    jobs = [Path(r["path"]).name for r in data["runs"]]
    assert jobs == [row[1] for row in sweep_rows]
    # The ranking is not the folders' order, so the order above is the ranking's doing.
    assert jobs != sorted(jobs)
    table = printed_table(
        out, "Runs ranked by final train/loss (as sweep_results.md ranks a sweep):"
    )
    assert table[0] == ["rank", "run", "train/loss", "train/acc", "grad_norm/total", "alerts"]
    for printed, sweep_row, summary in zip(table[1:], sweep_rows, data["runs"], strict=True):
        assert printed[0] == sweep_row[0] and printed[1] == summary["label"]
        assert printed[2:] == sweep_row[2:]  # loss, accuracy, gradient norm, alerts
        # TensorBoard's float32 copy of metrics.json's values is exact: they are float32 results.
        metrics = json.loads((Path(summary["path"]) / "metrics.json").read_text())
        for key in ("train/loss", "train/acc", "grad_norm/total"):
            assert summary["final"][key] == metrics[key]
    assert "did not finish" not in out  # no note: every run has its final metrics


def test_runs_without_final_metrics_are_ranked_last_with_a_note(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    final = {"train/loss": 0.2, "train/acc": 0.5, "grad_norm/total": 0.01}
    write_fixture_run(sweep / "a", seed=3, overrides=["seed=3"])  # the lowest loss, unfinished
    write_fixture_run(sweep / "b", seed=1, overrides=["seed=1"], final=final)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    table = printed_table(
        out, "Runs ranked by final train/loss (as sweep_results.md ranks a sweep):"
    )
    assert [row[:3] for row in table[1:3]] == [
        ["1", "seed=1", f"{f32(0.2):.6g}"],
        ["2", "seed=3", f"{f32(fixture_values(3)['train/loss'][STEPS[-1]]):.6g}"],
    ]
    assert table[3] == [
        "rank 2: no final metrics (the run did not finish): the last logged values, ranked"
        " after the finished runs"
    ]


def test_hyperparameters_table_shows_only_what_differs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (1, 3):  # the same optimizer, another lr
        write_fixture_run(sweep / f"seed={seed}", seed=seed, overrides=[f"seed={seed}"])
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert printed_table(out, "Hyperparameters that differ:") == [
        ["rank", "run", "lr"],
        ["1", "seed=3", "0.03"],
        ["2", "seed=1", "0.01"],
    ]
    assert "hparams:" not in out and "{" not in out


@pytest.mark.parametrize(
    ("markdown", "plain"),
    [
        ("**vanishing**: fc1 below 1e-7", "vanishing: fc1 below 1e-7"),
        ("**stall** at `fc2` *now*, __really__", "stall at fc2 now, really"),
        ("loss 2 * 3 = 6; layer fc_1_out", "loss 2 * 3 = 6; layer fc_1_out"),
    ],
)
def test_alerts_print_as_plain_text(markdown, plain):
    assert plain_text(markdown) == plain


@pytest.mark.parametrize(
    "text", ["{not json", '{"alerts": [{"step": 1}]}', '{"alerts": [{"step": 1, "kind": "v", '
             '"layers": "fc1"}]}'], ids=["not-json", "no-kind", "layers-a-string"]
)  # fmt: skip
def test_bad_gradients_json_is_a_warning_and_no_alert_is_marked(tmp_path, capsys, text):
    run = tmp_path / "run"
    write_fixture_run(run)
    (run / "gradients.json").write_text(text)
    assert main([str(run)]) == 0
    err = one_line(capsys.readouterr().err, "warning")
    assert f"{run / 'gradients.json'}: " in err and "not marked on the plots" in err
    assert load_run(run, Problems()).alert_marks == []


# ------------------------------------------------------------------------------------------------
# The plots: colours, alert marks, zeros on log axes, legends
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vanishing_run(tmp_path_factory) -> Run:
    """`experiment=vanishing` as shipped: 11 layers, vanishing alerts on fc1..fc5."""
    root = tmp_path_factory.mktemp("vanishing")
    command = [sys.executable, "-m", "gradwatch.train", "experiment=vanishing"]
    done = subprocess.run(
        [*command, "print_every=0", f"paths.root={root}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (root / "vanishing").iterdir()
    run = load_run(run_dir, Problems())
    label_runs([run])
    return run


def lines_by_layer(ax) -> dict[str, Any]:
    """The axes' series lines by the layer their label starts with (the legend's lines)."""
    return {
        line.get_label().split(" ")[0]: line
        for line in ax.get_lines()
        if line.get_label()[:1] != "_"
    }


def assert_legend_outside(fig) -> None:
    """Every legend is the figure's, clear of every axes (tick labels included), inside the
    figure: it covers no line."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert fig.legends
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_tightbbox(renderer)), (legend, ax.get_title())
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 1
        assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1 + 1


def test_every_layer_of_the_vanishing_run_has_its_own_colour(vanishing_run):
    from matplotlib.colors import to_hex

    fig = grad_norms_figure([vanishing_run])
    lines = lines_by_layer(fig.axes[0])
    layers = [f"fc{i}" for i in range(1, 12)]
    assert set(layers) <= set(lines)
    colours = [to_hex(lines[lay].get_color()) for lay in layers]
    assert len(set(colours)) == len(layers), colours
    assert to_hex(lines["total"].get_color()) not in colours
    assert_legend_outside(fig)


def test_alerted_layers_are_marked(vanishing_run):
    from matplotlib.colors import to_hex

    alerted = {lay for a in vanishing_run.alert_marks if a.kind == "vanishing" for lay in a.layers}
    assert {"fc1", "fc2", "fc3"} <= alerted
    fig = grad_norms_figure([vanishing_run])
    ax = fig.axes[0]
    lines = lines_by_layer(ax)
    labelled = {
        lay for lay, line in lines.items() if "(alert: vanishing at step" in line.get_label()
    }
    assert labelled == alerted
    # An alert on the whole model (no layer named) marks the total; this run has none.
    whole_model = [a for a in vanishing_run.alert_marks if not a.layers]
    assert ("(alert:" in lines["total"].get_label()) == bool(whole_model)
    # A ringed dot in fc1's colour at the step of fc1's alert, on fc1's line.
    (first,) = [a for a in vanishing_run.alert_marks if "fc1" in a.layers]
    steps, values = lines["fc1"].get_data()
    rings = [
        line
        for line in ax.get_lines()
        if line.get_marker() == "o"
        and to_hex(line.get_markerfacecolor()) == to_hex(lines["fc1"].get_color())
    ]
    assert len(rings) == 1
    assert rings[0].get_xdata()[0] == first.step
    assert rings[0].get_ydata()[0] == values[list(steps).index(first.step)]
    # fc1's histograms: a line at the alert's step.
    hist = histograms_figure([vanishing_run], "fc1")
    assert any(
        list(line.get_xdata()) == [first.step, first.step]
        for a in hist.axes
        for line in a.get_lines()
    )
    # The gradient-flow bars: the alerted layers hatched, the others not.
    bars = grad_flow_bars_figure([vanishing_run])
    hatched = [bar.get_hatch() == "//" for bar in bars.axes[0].patches]
    assert hatched == [f"fc{i}" in alerted for i in range(1, 12)]
    assert_legend_outside(bars)


def test_series_styles_never_repeat():
    for n in (1, 2, 10, 11, 12, 25):
        styles = series_styles(n)
        assert len({tuple(colour) for colour, _ in styles}) == n


def test_zero_notes():
    assert zero_note([1, 2, 3], [0.5, 0.0, 0.0]) == "0 from step 2"
    assert zero_note([1, 2, 3], [0.0, 0.5, 0.0]) == "0 at 2 steps from step 1"
    assert zero_note([1, 2], [0.5, math.nan]) is None


def test_zeros_are_marked_on_the_bottom_edge_of_log_axes(tmp_path):
    run_dir = tmp_path / "run"
    write_fixture_run(run_dir, zero_from=60)
    run = load_run(run_dir, Problems())
    label_runs([run])
    zeros = [60, 70, 80, 90]
    for fig, name in ((loss_figure([run]), "train/loss"), (grad_norms_figure([run]), "fc2")):
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith(name + " ")]
        assert line.get_label() == f"{name} (0 from step 60)"
        (triangles,) = [
            ln
            for ln in ax.get_lines()
            if ln.get_marker() == "v" and to_hex_color(ln) == to_hex_color(line)
        ]
        assert list(triangles.get_xdata()) == zeros
        # y in axes coordinates: 0 is the bottom edge, whatever the y limits.
        assert triangles.get_transform() == ax.get_xaxis_transform()
        assert list(triangles.get_ydata()) == [0.0] * len(zeros)
        assert_legend_outside(fig)


def to_hex_color(line) -> str:
    from matplotlib.colors import to_hex

    return to_hex(line.get_color())


def test_legends_of_overlaid_runs_are_outside_the_axes(tmp_path):
    sweep = tmp_path / "sweep"
    runs = []
    for seed in (1, 2, 3):
        write_fixture_run(sweep / f"seed={seed}", seed=seed, overrides=[f"seed={seed}"])
        runs.append(load_run(sweep / f"seed={seed}", Problems()))
    label_runs(runs)
    for fig in (
        loss_figure(runs),
        grad_norms_figure(runs),
        grad_flow_bars_figure(runs),
        tags_figure(runs, ["train/acc", "update_ratio/fc1"]),
    ):
        assert_legend_outside(fig)
        assert fig.legends[0].get_texts()[0].get_text().startswith("seed=")


def test_grad_flow_png_rings_the_monitors_alerts(tmp_path):
    history = {
        "step": [0, 10, 20],
        "layers": {"fc1": [1e-3, 1e-8, 0.0], "fc2": [1e-1, 1e-2, 1e-3]},
        "totals": {"total": [1e-1, 1e-2, 1e-3]},
    }
    alerts = [{"step": 10, "kind": "vanishing", "layers": ["fc1"], "message": "..."}]
    fig = grad_flow_figure(history, alerts)
    lines = lines_by_layer(fig.axes[0])
    assert lines["fc1"].get_label() == "fc1 (0 from step 20; alert: vanishing at step 10)"
    assert lines["fc2"].get_label() == "fc2"
    (ring,) = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([10], [1e-8])
    assert_legend_outside(fig)
    assert save_grad_flow(history, tmp_path / "grad_flow.png", alerts).is_file()


def test_a_layer_whose_gradient_is_always_0_has_a_triangle_for_a_bar(tmp_path):
    run_dir = tmp_path / "run"
    write_fixture_run(run_dir, zero_from=0)  # grad_norm/fc2 (and train/loss) 0 throughout
    run = load_run(run_dir, Problems())
    label_runs([run])
    fig = grad_flow_bars_figure([run])
    ax = fig.axes[0]
    (triangles,) = [ln for ln in ax.get_lines() if ln.get_marker() == "v"]
    assert list(triangles.get_xdata()) == [1.0]  # fc2's place; fc1's bar is drawn
    assert triangles.get_transform() == ax.get_xaxis_transform()
    assert "value 0 (off the log axis)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert_legend_outside(fig)
