"""Finding and reading the runs that `gradwatch-report` reports on (see `gradwatch.report`), and
the per-layer views of a run that its tables and plots share.

Every read of a run's file goes through `reading`, which turns an OSError or a parse error into
one `DataError` line naming the file. What cannot be read is collected in `Problems` and said
in one line each: errors (data missing from the report, exit status 1) and warnings (only the
legend labels fall back, exit status 0).
"""

import json
import math
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import yaml
from google.protobuf.message import DecodeError
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.proto import event_pb2

from gradwatch.layers import layer_of

EVENT_PREFIX = "events.out.tfevents"
# Everything for scalars, histograms and text (alerts, hparams); images and audio are not used.
SIZE_GUIDANCE = {
    ea.SCALARS: 0,
    ea.HISTOGRAMS: 0,
    ea.TENSORS: 0,
    ea.COMPRESSED_HISTOGRAMS: 1,
    ea.IMAGES: 1,
    ea.AUDIO: 1,
}
# Overrides that say where a run lives or what its console shows, not what it trains: left out
# of legend labels, as conf/config.yaml's override_dirname.exclude_keys leave them out of run
# folder names (experiment=... stays: it says what the run is).
LABEL_SKIP = (
    "paths.",
    "hydra.",
    "ckpt_path=",
    "name=",
    "print_every=",
    "trainer.enable_progress_bar=",
    "trainer.enable_model_summary=",
)


class ReportError(Exception):
    """A problem with the user's input (a path, a layer name): one line, exit status 2."""


class DataError(Exception):
    """A file that could not be read (a run's) or written (the report's): one line, exit
    status 1."""


@dataclass
class Problems:
    """What could not be read, one line each. Errors: data missing from the report. Warnings:
    only the labels are worse."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class AlertMark:
    """One alert of the monitor, as `gradients.json` records it: the layers it names (none for
    an alert on the whole model: a stall, an exploding total)."""

    step: int
    kind: str
    layers: list[str]


@dataclass
class Run:
    """What one run's event files hold, as plain lists, and the alerts of its `gradients.json`."""

    path: Path
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    # tag -> [(step, bucket left edges, bucket right edges, counts)]
    histograms: dict[str, list[tuple[int, list[float], list[float], list[float]]]] = field(
        default_factory=dict
    )
    alerts: list[tuple[int, str]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    # The text tag says which layers an alert names only in prose; gradients.json says it as a
    # list, so the plots mark alerted layers from here.
    alert_marks: list[AlertMark] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# The one place where reading a file can fail
# ------------------------------------------------------------------------------------------------


def cannot_read(path: Any, error: OSError) -> str:
    return f"{path}: cannot read: {error.strerror or error}"


def _what_is_wrong(error: Exception) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"not valid YAML: {error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(error, yaml.YAMLError):
        return f"not valid YAML: {error}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.start})"
    return f"not readable as TensorBoard events ({type(error).__name__}: {error})"


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Every read of a run's file goes through here: a file the OS refuses or a parser rejects
    becomes one `DataError` line naming the file, never a traceback."""
    try:
        yield
    except OSError as error:
        raise DataError(cannot_read(path, error)) from None
    except (yaml.YAMLError, UnicodeDecodeError, DecodeError) as error:
        raise DataError(f"{path}: {_what_is_wrong(error)}") from None


# ------------------------------------------------------------------------------------------------
# Finding runs
# ------------------------------------------------------------------------------------------------


def find_runs(path: Path, problems: Problems) -> list[Path]:
    """`path` itself if it holds event files, else every directory below it that does (a sweep).
    A folder that cannot be listed is an error in `problems`; the others are still found."""
    with reading(path):  # exists() raises, not returns False, inside a folder we may not enter
        if not path.exists():
            raise ReportError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory (give a run directory or a sweep folder)")
    unlisted: list[str] = []

    def unlistable(error: OSError) -> None:
        # os.walk skips a folder it cannot list unless told: a sweep's job would vanish unsaid.
        unlisted.append(cannot_read(error.filename, error))

    runs = []
    for root, dirs, files in os.walk(path, onerror=unlistable):
        dirs.sort()
        if any(f.startswith(EVENT_PREFIX) for f in files):
            runs.append(Path(root))
            dirs.clear()  # a run's subdirectories (checkpoints, report) are part of it
    problems.errors += unlisted
    if not runs and not unlisted:
        raise ReportError(
            f"{path}: no TensorBoard event files ({EVENT_PREFIX}.*) in it or below it;"
            " give a run directory such as outputs/xor/<timestamp> or a sweep folder"
        )
    return runs


# ------------------------------------------------------------------------------------------------
# Reading a run
# ------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    number = isinstance(value, int | float)
    return kinds.get(type(value), "a number" if number else type(value).__name__)


def read_overrides(run_dir: Path, problems: Problems) -> list[str]:
    """The run's command-line overrides: gradwatch's `overrides.yaml`, else Hydra's own. They
    only make labels, so a bad file is a warning and the run is labelled by its folder."""
    for candidate in (run_dir / "overrides.yaml", run_dir / ".hydra" / "overrides.yaml"):
        try:
            with reading(candidate):
                if not candidate.is_file():
                    continue
                loaded = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            if loaded is None:  # an empty file: no overrides
                return []
            if not isinstance(loaded, list):
                raise DataError(f"{candidate}: {_kind(loaded)}, not a YAML list of overrides")
            for i, item in enumerate(loaded):
                if not isinstance(item, str):
                    raise DataError(f"{candidate}: item {i + 1} is {_kind(item)}, not an override")
            return loaded
        except DataError as error:
            problems.warnings.append(f"{error}; the run is labelled by its folder")
            return []
    return []


def read_alert_marks(run_dir: Path, problems: Problems) -> list[AlertMark]:
    """The alerts in the run's `gradients.json` (written at the end of training; none while a
    run trains or after a hard kill). They only mark the plots, so a bad file is a warning."""
    path = run_dir / "gradients.json"
    try:
        with reading(path):
            if not path.is_file():
                return []
            text = path.read_text(encoding="utf-8")
        return [_alert_mark(alert) for alert in json.loads(text)["alerts"]]
    except DataError as error:  # a file the OS or UTF-8 refuses
        problem = str(error)
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not the monitor's shape
        problem = f"{path}: not the monitor's gradients.json ({type(error).__name__}: {error})"
    problems.warnings.append(f"{problem}; its alerts are not marked on the plots")
    return []


def _alert_mark(alert: dict[str, Any]) -> AlertMark:
    layers = alert["layers"]
    if not (isinstance(layers, list) and all(isinstance(lay, str) for lay in layers)):
        raise TypeError(f"an alert's layers are {layers!r}, not a list of layer names")
    return AlertMark(step=int(alert["step"]), kind=str(alert["kind"]), layers=layers)


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (as gradwatch.overhead, which imports Lightning; this does not)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def check_records(path: Path) -> tuple[int, str | None]:
    """How many records of an event file are whole, and what is wrong after them, if anything.

    TensorBoard's loader (event_file_loader.RawEventFileLoader.Load) swallows the DataLossError
    of a bad checksum or a cut record and stops reading the file, logging at debug level only:
    a garbage file would look like a run without tags. So the records are walked here first,
    framed as its reader frames them: length (8 bytes), masked CRC of the length, data, masked
    CRC of the data; each parsed as an Event, as its loader does. OSError is left to
    `reading`."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a FIFO named like an event file would block forever
        raise DataError(f"{path}: not a regular file")
    size = info.st_size
    count = 0
    with path.open("rb") as f:
        while (start := f.tell()) < size:
            head = f.read(12)
            where = f"record {count + 1} (byte {start})"
            if len(head) < 12:
                return count, f"{where} is cut short (a run still writing, or killed mid-write)"
            length, length_crc = struct.unpack("<QI", head)
            if _masked_crc32c(head[:8]) != length_crc:
                return count, f"{where} fails its checksum"
            if start + 12 + length + 4 > size:  # checked before reading: `length` may be huge
                return count, f"{where} is cut short (a run still writing, or killed mid-write)"
            data, data_crc = f.read(length), struct.unpack("<I", f.read(4))[0]
            if _masked_crc32c(data) != data_crc:
                return count, f"{where} fails its checksum"
            try:
                event_pb2.Event.FromString(data)
            except DecodeError:  # the loader raises this one, so the whole run is unreadable
                raise DataError(f"{path}: {where} is not a TensorBoard event") from None
            count += 1
    return count, None


def _check_event_files(path: Path, problems: Problems) -> None:
    """Raise DataError if no event file of the run has a readable record; note in `problems`
    the files TensorBoard reads only part of, or none of."""
    with reading(path):
        files = sorted(p for p in path.iterdir() if p.name.startswith(EVENT_PREFIX))
    lost, empty, records = [], [], 0
    for file in files:
        with reading(file):
            count, fault = check_records(file)
        records += count
        if fault and count:
            lost.append(f"{file}: {fault}; the report shows the {count} records before it")
        elif fault:
            lost.append(f"{file}: not a readable event file: {fault}")
        elif not count:
            empty.append(f"{file}: empty, no events")
    if not records:
        raise DataError("; ".join(lost + empty) or f"{path}: no event files")
    problems.errors += lost


def _plugin_tags(acc: ea.EventAccumulator, plugin: str) -> dict[str, bytes]:
    try:
        return acc.PluginTagToContent(plugin)
    except KeyError:  # no summary of that plugin in this run
        return {}


def _hparams(acc: ea.EventAccumulator) -> dict[str, Any]:
    """Hyperparameters the HParams plugin recorded for this run (its session start info)."""
    from tensorboard.plugins.hparams import metadata as hp_metadata

    raw = _plugin_tags(acc, hp_metadata.PLUGIN_NAME).get(hp_metadata.SESSION_START_INFO_TAG)
    if raw is None:
        return {}
    info = hp_metadata.parse_session_start_info_plugin_data(raw)
    out: dict[str, Any] = {}
    for name, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[name] = getattr(value, kind) if kind else None
    return out


def _text(tensor_proto: Any) -> str:
    from tensorboard.util import tensor_util

    values = tensor_util.make_ndarray(tensor_proto).reshape(-1)
    return " ".join(v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values)


def load_run(path: Path, problems: Problems) -> Run:
    """Every scalar, histogram, alert and hyperparameter in the run's event files. DataError if
    none can be read; partly readable files and a bad overrides.yaml go into `problems`."""
    _check_event_files(path, problems)
    run = Run(path=path, overrides=read_overrides(path, problems))
    run.alert_marks = read_alert_marks(path, problems)
    # The records passed their checksums, but one may still not be an Event (DecodeError).
    with reading(path):
        acc = ea.EventAccumulator(str(path), size_guidance=SIZE_GUIDANCE)
        acc.Reload()
        tags = acc.Tags()
        for tag in tags[ea.SCALARS]:
            events = acc.Scalars(tag)
            run.scalars[tag] = ([e.step for e in events], [e.value for e in events])
        for tag in tags[ea.HISTOGRAMS]:
            rows = []
            for e in acc.Histograms(tag):
                h = e.histogram_value
                right = list(h.bucket_limit)
                left = [min(h.min, right[0]) if right else h.min, *right[:-1]]
                rows.append((e.step, left, right, list(h.bucket)))
            run.histograms[tag] = rows
        for tag in _plugin_tags(acc, "text"):
            if tag == "alerts" or tag.startswith("alerts/"):
                run.alerts += [(e.step, _text(e.tensor_proto)) for e in acc.Tensors(tag)]
        run.alerts.sort(key=lambda a: a[0])
        run.hparams = _hparams(acc)
    return run


def label_runs(runs: list[Run]) -> None:
    """Legend labels: the overrides that tell the runs apart, else `<name>/<run dir>`, the run's
    name in `tensorboard --logdir outputs`."""
    kept = [[o for o in r.overrides if not o.startswith(LABEL_SKIP)] for r in runs]
    common = set.intersection(*(set(k) for k in kept)) if len(runs) > 1 else set()
    labels = [
        ",".join(o for o in k if o not in common) or f"{r.path.parent.name}/{r.path.name}"
        for k, r in zip(kept, runs, strict=True)
    ]
    for i, r in enumerate(runs):
        r.label = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]} ({r.path.name})"


# ------------------------------------------------------------------------------------------------
# Per-layer views of a run: what the tables print and the plots draw
# ------------------------------------------------------------------------------------------------


def scalar_family(run: Run, family: str) -> dict[str, tuple[list[int], list[float]]]:
    """`<family>/<name>` tags by name: `scalar_family(run, "update_ratio")["fc1"]`."""
    prefix = family + "/"
    return {t[len(prefix) :]: v for t, v in run.scalars.items() if t.startswith(prefix)}


def layer_series(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """`grad_norm/<layer>` per layer (`total` excluded); from the parameters' norms if only those
    were logged. A tag is a parameter when its name minus the last `.part` is also a tag."""
    norms = {k: v for k, v in scalar_family(run, "grad_norm").items() if not k.startswith("total")}
    layers = {k: v for k, v in norms.items() if not (layer_of(k) != k and layer_of(k) in norms)}
    if layers:
        return layers
    out: dict[str, tuple[list[int], list[float]]] = {}
    groups: dict[str, list[str]] = {}
    for name in norms:
        groups.setdefault(layer_of(name), []).append(name)
    for lay, names in groups.items():
        steps = norms[names[0]][0]
        squares = np.sum([np.square(norms[n][1], dtype=np.float64) for n in names], axis=0)
        out[lay] = (steps, np.sqrt(squares).tolist())
    return out


def last_value(series: tuple[list[int], list[float]] | None) -> float | None:
    return series[1][-1] if series and series[1] else None


def layer_table(run: Run) -> dict[str, dict[str, float | None]]:
    """Per layer (and `total`): first/last/min/max/mean gradient norm, last update ratio, last
    weight norm (the L2 norm of all the layer's parameters together)."""
    rows: dict[str, dict[str, float | None]] = {}
    series = layer_series(run)
    total = run.scalars.get("grad_norm/total")
    if total:
        series = {**series, "total": total}
    ratios = scalar_family(run, "update_ratio")
    weights = scalar_family(run, "weight_norm")
    for lay, (_, values) in series.items():
        finite = [v for v in values if math.isfinite(v)]
        if lay == "total":
            params = list(weights)
        else:
            params = [n for n in weights if n == lay or layer_of(n) == lay]
        lasts = [last_value(weights[n]) for n in params]
        rows[lay] = {
            "first": values[0] if values else None,
            "last": values[-1] if values else None,
            "min": min(finite) if finite else None,
            "max": max(finite) if finite else None,
            "mean": float(np.mean(finite)) if finite else None,
            "update_ratio": last_value(ratios.get(lay)),
            "weight_norm": math.sqrt(sum(v * v for v in lasts)) if params else None,
        }
    return rows


def loss_tags(run: Run) -> list[str]:
    return sorted(t for t in run.scalars if t == "loss" or t.endswith("/loss"))


def alerts_on(run: Run, layer: str) -> list[AlertMark]:
    """The run's alerts that name `layer`; an alert naming no layer is on `total`."""
    return [a for a in run.alert_marks if layer in (a.layers or ["total"])]
