"""Where the monitor's values go: every logger in ``trainer.loggers``.

TensorBoard gets all of a step's scalars as one event and all of its histograms as another (one
record and one checksum each): its logger's ``log_metrics`` writes one event per scalar, which
costs more than computing the norms. Every other logger gets ``log_metrics``.
"""

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from gradwatch.monitor.alerts import Alert
from gradwatch.monitor.histograms import Histogram


def write_scalars(
    loggers: list[Logger],
    metrics: dict[str, float],
    step: int,
    tensorboard_only: dict[str, float] | None = None,
) -> None:
    """``metrics`` to every logger; ``tensorboard_only`` (the first screen's log10 copies) to
    TensorBoard, in the same event."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            summary = Summary()
            add = summary.value.add  # half the time of building Summary.Value objects first
            for tag, value in metrics.items():
                add(tag=tag, simple_value=value)
            for tag, value in (tensorboard_only or {}).items():
                add(tag=tag, simple_value=value)
            _write(logger, summary, step)
        else:
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
    _write(logger, Summary(value=values), step)


def write_alert(logger: TensorBoardLogger, alert: Alert) -> None:
    """An alert in TensorBoard's Text tab, under ``alerts``: its kind, the diagnosis, the fix."""
    fix = f" Fix: {alert.fix}" if alert.fix else ""
    logger.experiment.add_text("alerts", f"**{alert.kind}**: {alert.message}.{fix}", alert.step)


def _write(logger: TensorBoardLogger, summary: Summary, step: int) -> None:
    logger.experiment._get_file_writer().add_summary(summary, step)
