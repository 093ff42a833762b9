"""The monitor's own TensorBoard records: the bytes protobuf would write, framed and checksummed
as TensorBoard's writer frames them, appended beside what the writer writes (each tag's steps in
order), and through the writer where they cannot be."""

import math
import struct

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from test_monitor import read_events, scalars

from gradwatch.monitor import writers
from gradwatch.monitor.histograms import Histogram

VALUES = {
    "grad_norm/fc1": 0.123,
    "zero": 0.0,
    "grad_norm_log10/fc1": -3.2,
    "a/long/tag/" * 20: 1e38,
    "spike/grad_norm": math.inf,
    "beyond float32": 1e300,
    "below float32": -1e300,
    "nan": math.nan,
    "ünïcode/ß": 5.0,
}


# Values within float32 take the fast spelling; one beyond it, the value by value one.
WITHIN = {tag: v for tag, v in VALUES.items() if "float32" not in tag}


@pytest.mark.parametrize("values", [VALUES, WITHIN], ids=["beyond_float32", "within_float32"])
@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40, 2**62])
def test_scalar_events_are_the_bytes_protobuf_writes(step, values):
    summary = Summary()
    for tag, value in values.items():
        summary.value.add(tag=tag, simple_value=value)
    expected = Event(wall_time=1733280000.123456, step=step, summary=summary).SerializeToString()
    assert writers.scalar_event_bytes(step, 1733280000.123456, values) == expected


def test_records_carry_tensorboards_own_checksums():
    """TensorBoard's pure-Python masked CRC32C (what its reader checks) of the header and the
    data, around them."""
    data = writers.scalar_event_bytes(7, 1.5, VALUES)
    record = writers._record(data)
    header = struct.pack("<Q", len(data))
    assert record == (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def written(tmp_path, fast: bool, monkeypatch) -> dict:
    monkeypatch.setattr(writers, "fast_checksums", lambda: fast)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    logger.log_metrics({"train/loss": 0.5}, step=3)  # queued in TensorBoard's writer first
    writers.write_scalar_steps(
        [logger], [(s, 100.0 + s, {"grad_norm/total": s / 10}, {"x": 1.0}) for s in range(4, 9)]
    )
    hist = Histogram("grad_hist/fc1.weight", -1.0, 1.0, 4, 0.0, 2.0, [0.0, 1.0], [2, 2])
    writers.write_histograms(logger, [hist], 9)
    logger.log_metrics({"train/loss": 0.25}, step=9)
    logger.finalize("success")
    return read_events(tmp_path)


@pytest.mark.parametrize("fast", [True, False])
def test_appended_and_written_through_the_writer_read_back_the_same(tmp_path, fast, monkeypatch):
    acc = written(tmp_path, fast, monkeypatch)
    values = scalars(acc)
    assert values["train/loss"] == {3: 0.5, 9: 0.25}
    assert values["grad_norm/total"] == pytest.approx({s: s / 10 for s in range(4, 9)})
    assert [e.wall_time for e in acc.Scalars("grad_norm/total")] == [104, 105, 106, 107, 108]
    [h] = acc.Histograms("grad_hist/fc1.weight")
    assert (h.step, list(h.histogram_value.bucket)) == (9, [2.0, 2.0])
