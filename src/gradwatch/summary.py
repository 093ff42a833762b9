"""What a finished run leaves for comparison: metrics.json and TensorBoard's HParams entry."""

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summary
from typing_extensions import override

from gradwatch.monitor import GradientMonitor, sharded

# The HParams columns ticked by default. TensorBoard (backend_context.
# _sort_and_reduce_to_hparams_limit) orders the experiment's hparams by `differs` (true first),
# then by name, and ticks the first five: marking these five as differing puts the choices that
# tell runs apart (not data.batch_size=null, data.n_samples, ...) in the table; every other
# hparam stays one tick away. Every run writes the same set, whichever run's experiment TB reads.
SHOWN_HPARAMS = (
    "model.activation",
    "model.layer_sizes",
    "optimizer",
    "optimizer.lr",
    "trainer.max_epochs",
)

log = logging.getLogger("gradwatch")


@torch.no_grad()
def final_metrics(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    precision: Precision | None = None,
) -> dict[str, float]:
    """Loss (and accuracy) of the trained model on the whole train and val sets, and the norm
    of the last step's gradients. ``precision``: the Trainer's precision plugin, which the data
    and the forward go through as in a validation step (``64-true`` trains on doubles,
    ``bf16-mixed`` under autocast)."""
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    metrics = {}
    splits = {"train": (datamodule.train_x, datamodule.train_y)}
    if len(datamodule.val_x):
        splits["val"] = (datamodule.val_x, datamodule.val_y)
    for split, (x, y) in splits.items():
        x, y = precision.convert_input((x.to(model.device), y.to(model.device)))
        with precision.val_step_context():
            out = model(x)
            metrics[f"{split}/loss"] = model.compute_loss(out, y).item()
            if y.dtype == torch.long:
                metrics[f"{split}/acc"] = model.accuracy(out, y).item()
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if grads:
        metrics["grad_norm/total"] = total_norm(grads)
    model.train(was_training)
    return metrics


def total_norm(grads: list[torch.Tensor]) -> float:
    """The L2 norm of every gradient together. Of FSDP2's sharded gradients (each rank holds some
    rows, maybe none), from every rank's shards: a collective, which every rank joins."""
    if not any(sharded.is_sharded(g) for g in grads):
        return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    local_norms = torch.stack([torch.linalg.vector_norm(sharded.local(g)) for g in grads])
    (norms,) = sharded.all_reduce([(local_norms, sharded.norm(2.0))])
    return torch.linalg.vector_norm(norms).item()


class RunSummary(Callback):
    """At the end of training: final metrics to `metrics.json` in `run_dir`, and the run's
    hyperparameters with those metrics (under `final/...`) to TensorBoard's HParams dashboard,
    so the runs of a sweep compare in one table. Written before Lightning closes the loggers.

    Args:
        run_dir: the run directory.
        hparams: flat hyperparameters (str, int, float or bool values) to show in HParams.
    """

    def __init__(self, run_dir: str | Path, hparams: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.hparams = hparams
        self.metrics: dict[str, float] = {}
        self._start = 0.0

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start = time.perf_counter()

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        fit_seconds = time.perf_counter() - self._start
        self.metrics = final_metrics(pl_module, trainer.datamodule, trainer.precision_plugin)
        monitor = next((c for c in trainer.callbacks if isinstance(c, GradientMonitor)), None)
        if monitor is not None:
            alerts = monitor.summary()["alerts"]
            self.metrics["alerts"] = len(alerts)
            for alert in alerts:  # per kind too: alerts/stall, alerts/vanishing, ...
                key = f"alerts/{alert['kind']}"
                self.metrics[key] = self.metrics.get(key, 0) + 1
        self.metrics.update(
            epochs=trainer.current_epoch, steps=trainer.global_step, fit_seconds=fit_seconds
        )
        if not trainer.is_global_zero:
            return
        (self.run_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        log.info("Final: " + ", ".join(f"{k} {v:.6g}" for k, v in self.metrics.items()))
        final = {
            "final/" + key.replace("/", "_"): value
            for key, value in self.metrics.items()
            if key != "fit_seconds"
        }
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                # The HParams plugin reads each metric as the last value of its scalar tag.
                for summary in hparams_experiment(self.hparams, final):
                    logger.experiment._get_file_writer().add_summary(summary)
            else:  # MLflow, CSV: the run's settings as their parameters
                logger.log_hyperparams(self.hparams)


def hparams_experiment(hparams: dict[str, Any], metrics: dict[str, float]) -> list:
    """TensorBoard's HParams summaries (experiment, session start, session end) for `hparams`
    and the final `metrics` tags, with :data:`SHOWN_HPARAMS` marked to show by default."""
    experiment, start, end = hparams_summary(hparams, dict.fromkeys(metrics, 0.0))
    content = experiment.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(content.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in SHOWN_HPARAMS
    content.content = data.SerializeToString()
    return [experiment, start, end]
