"""Where the monitor's values go: every logger in ``trainer.loggers``.

TensorBoard gets all of a step's scalars as one event and all of its histograms as another:
its logger's ``log_metrics`` writes one event per scalar, which costs more than computing the
norms. Every other logger gets ``log_metrics``.

The monitor's events are appended to the run's event file (the TensorBoard logger's own) in one
write per logging step, framed as TensorBoard frames them, with the record checksums of
``google-crc32c``'s C extension (a dependency). TensorBoard's writer computes them in pure Python
in its writer thread, holding the GIL: about 0.2 us a byte, 1 to 3 ms for a histogram event,
which the training loop waits for; and it opens and closes the file for every record, behind a
queue of ten, so that every_step's fifty events in a row would hold up the loop for about as long
as fifty steps' norms. The writer appends too, a record per write, and has written the file's
first record (which truncates it) by the time it exists: a write of ours lands between two of its
records, never inside one, and waits for nothing it has queued. The tags written here are never
written through the writer (alerts, which are, have a tag of their own), so each tag's steps stay
in order; TensorBoard reads each tag's steps in file order. Where the file is not local or the C
checksum is missing, events go through the writer. Nothing of TensorBoard's is changed: other
writers in the process keep their own checksums.
"""

import functools
import math
import operator
import struct
import time

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from gradwatch.monitor.alerts import Alert
from gradwatch.monitor.histograms import Histogram
from gradwatch.overhead import masked_crc32c

# A step's scalars: (step, wall time, metrics for every logger, TensorBoard-only values).
ScalarStep = tuple[int, float, dict[str, float], dict[str, float]]


def write_scalars(
    loggers: list[Logger],
    metrics: dict[str, float],
    step: int,
    tensorboard_only: dict[str, float] | None = None,
) -> None:
    """``metrics`` to every logger; ``tensorboard_only`` (the first screen's log10 copies) to
    TensorBoard, in the same event."""
    write_scalar_steps(loggers, [(step, time.time(), metrics, tensorboard_only or {})])


def write_scalar_steps(loggers: list[Logger], steps: list[ScalarStep]) -> None:
    """Many steps' scalars in order (every_step's steps since the last logging step): an event
    per step, in one write."""
    if not steps:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            events = [
                scalar_event_bytes(step, wall, {**metrics, **extra})
                for step, wall, metrics, extra in steps
            ]
            _append(logger, events)
        else:
            for step, _, metrics, _ in steps:
                logger.log_metrics(metrics, step=step)


def write_histograms(logger: TensorBoardLogger, hists: list[Histogram], step: int) -> None:
    values = [
        Summary.Value(
            tag=h.tag,
            histo=HistogramProto(
                min=h.min,
                max=h.max,
                num=h.num,
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limit=h.bucket_limit,
                bucket=h.bucket,
            ),
        )
        for h in hists
    ]
    event = Event(wall_time=time.time(), step=step, summary=Summary(value=values))
    _append(logger, [event.SerializeToString()])


def write_alert(logger: TensorBoardLogger, alert: Alert) -> None:
    """An alert in TensorBoard's Text tab, under ``alerts``: its kind, the diagnosis, the fix."""
    fix = f" Fix: {alert.fix}" if alert.fix else ""
    logger.experiment.add_text("alerts", f"**{alert.kind}**: {alert.message}.{fix}", alert.step)


def scalar_event_bytes(step: int, wall_time: float, values: dict[str, float]) -> bytes:
    """``Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value)...]))`` encoded
    as protobuf encodes it, in a fifth of the time of building the messages: an event per step
    is most of every_step's cost on the host. (Fields: Event 1 wall_time double, 2 step varint,
    5 summary; Summary 1 value; Value 1 tag, 2 simple_value float.)"""
    try:  # C-level iteration: every step of every_step comes through here
        summary = b"".join(
            map(operator.add, map(_value_prefix, values), map(_F32, values.values()))
        )
    except OverflowError:  # a value beyond float32
        summary = b"".join(_value_prefix(tag) + _float32(v) for tag, v in values.items())
    step_field = b"\x10" + _varint(step) if step else b""  # proto3 leaves out a zero
    return (
        b"\x09" + struct.pack("<d", wall_time) + step_field + b"\x2a" + _varint(len(summary))
    ) + summary


def _append(logger: TensorBoardLogger, events: list[bytes]) -> None:
    """Serialized events at the end of the logger's event file, in one write (see above)."""
    file_writer = logger.experiment._get_file_writer()
    path = getattr(file_writer.event_writer, "_file_name", "")
    if not path or "://" in path or not fast_checksums():
        for data in events:
            event = Event.FromString(data)
            file_writer.add_event(event, event.step, event.wall_time)
        return
    with open(path, "ab") as f:
        f.write(b"".join(_record(data) for data in events))


def _record(data: bytes) -> bytes:
    """One TFRecord: the length, its masked CRC32C, the data, its masked CRC32C (TensorBoard's
    RecordWriter)."""
    header = struct.pack("<Q", len(data))
    crcs = struct.pack("<I", masked_crc32c(header)), struct.pack("<I", masked_crc32c(data))
    return header + crcs[0] + data + crcs[1]


@functools.cache
def fast_checksums() -> bool:
    """Whether ``google-crc32c`` has its C extension here."""
    try:
        import google_crc32c
    except ImportError:
        return False
    return google_crc32c.implementation == "c"


@functools.lru_cache(maxsize=4096)
def _value_prefix(tag: str) -> bytes:
    """A Summary's value field up to the float: its length, the tag, the float's key."""
    name = tag.encode()
    value = b"\x0a" + _varint(len(name)) + name + b"\x15"
    return b"\x0a" + _varint(len(value) + 4) + value


_F32 = struct.Struct("<f").pack


def _float32(value: float) -> bytes:
    try:
        return _F32(value)
    except OverflowError:  # beyond float32: infinite, as protobuf stores it
        return struct.pack("<f", math.copysign(math.inf, value))


def _varint(n: int) -> bytes:
    if n < 0:  # int64: two's complement in ten bytes
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
