"""A logging step after its optimizer step: what the hooks took before the step
(:class:`TakenStep`) goes to the host in one transfer (under FSDP2, one all-reduce) with the
update norms, the activation statistics, every_step's buffered steps and the loss; then the
scalars, the alerts and the histograms are worked out and written (:class:`StepFinisher`)."""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from gradwatch.monitor import first_screen, histograms, sharded, stats, writers
from gradwatch.monitor.activations import STATS, ActivationProbe
from gradwatch.monitor.alerts import Alert, GradientAlert
from gradwatch.monitor.every_step import StepBuffer, StepValues, checked_events
from gradwatch.monitor.health import Health, Observation
from gradwatch.monitor.names import Tags
from gradwatch.monitor.scalars import step_scalars
from gradwatch.monitor.spikes import SpikeWatch
from gradwatch.monitor.stats import Measurement
from gradwatch.monitor.writers import ScalarStep


@dataclass
class TakenStep:
    """What a logging step's hooks took before its optimizer step (one measurement per
    optimizer that stepped).

    Attributes:
        no_gradient: the tags of stepped parameters whose ``.grad`` was None.
        not_optimized: the tags of parameters with a gradient that no optimizer steps.
        carried: per measurement, the (carried, fresh) norms of the carried-gradient check,
            None where nothing was carried; empty where the check did not run.
    """

    step: int
    write_scalars: bool
    write_hist: bool
    not_optimized: list[str]
    measurements: list[Measurement] = field(default_factory=list)
    no_gradient: list[str] = field(default_factory=list)
    carried: list[Tensor | None] = field(default_factory=list)


@dataclass
class StepFinisher:
    """Finishes the monitor's logging steps: its settings and the parts it writes with, set up
    once the Trainer is known (``on_train_start``)."""

    tags: Tags
    norm_types: list[float]
    health: Health
    spikes: SpikeWatch
    probe: ActivationProbe
    buffer: StepBuffer
    scaler: Any  # the precision plugin's GradScaler, if any
    tb: TensorBoardLogger | None
    sharded: bool
    bins: int
    histogram_min_values: int
    log_weight_norms: bool
    log_update_ratio: bool
    on_nonfinite: str
    on_spike: str
    low_precision: dict[str, str]  # 16-bit layers' dtypes
    zero_eps: dict[str, float]  # float16 layers whose optimizer's eps float16 rounds to 0

    def finish(
        self,
        trainer: "pl.Trainer",
        taken: TakenStep,
        loss: Tensor | None,
        first_bad: Tensor | None,
    ) -> None:
        """After the optimizer step: the update norms, the one transfer, then scalars, alerts and
        histograms. ``first_bad``: with ``on_nonfinite="stop"``, the first step since the last
        logging step with a non-finite gradient (-1: none), on the device."""
        parts = [part for m in taken.measurements for part in stats.device_parts(m)]
        # Lightning clips after the measuring hook; the gradients hold the clipped values until
        # the next zero_grad, so the clipped total is measured from them.
        grads = [g for m in taken.measurements for g in m.grads]
        clipped = bool(trainer.gradient_clip_val) and bool(grads)
        if clipped:
            parts.append((stats.total_norm(grads), sharded.norm(2.0)))
        if loss is not None and taken.write_scalars:
            if self.sharded:  # the mean over the ranks joins the step's one all-reduce
                parts.append((loss.detach().reshape(1), sharded.MEAN))
            else:
                parts.append((logged_loss(trainer, loss), sharded.SAME))
        if first_bad is not None:
            # None yet (-1) travels as +inf, so that the earliest step over the ranks is the min.
            bad = first_bad.reshape(1).to(stats.exact_dtype(first_bad.device))
            parts.append((torch.where(bad < 0, math.inf, bad), sharded.MIN))
        activations = dict(self.probe.stats) if taken.write_scalars else {}
        # Activation histograms (on request): the outputs the probe kept, under the layer's tag.
        activation_values = {
            self.tags.layer(layer): values for layer, values in self.probe.values.items()
        }
        self.probe.stats, self.probe.values = {}, {}
        # Each rank's share of dead, saturated or alike units is of its own batch: their mean.
        parts += [(a, sharded.MEAN) for a in activations.values()]
        followed = bool(taken.carried)  # the carried-gradient check ran: 0 unless measured
        carried_pairs = [c for c in taken.carried if c is not None]
        carried = torch.stack(carried_pairs).norm(dim=0) if carried_pairs else None
        if carried is not None:
            parts.append((carried, sharded.norm(2.0)))
        scaler = self.scaler
        amp_scale = (
            scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else None
        )
        if amp_scale is not None:
            parts.append((amp_scale.detach().reshape(1).float(), sharded.SAME))
        # every_step: the steps since the last logging step, this one included, in the transfer.
        buffered = bool(self.buffer.records) and taken.write_scalars
        if buffered:
            parts += self.buffer.parts(self.sharded)
        jobs_tensors: list[Tensor] = []
        if taken.write_hist and self.tb is not None:
            for m in taken.measurements:
                grads = zip(m.grad_names, m.grad_copies or [], strict=False)
                jobs_tensors += [t for n, t in grads if self._drawn(m.grad_numels[n])]
                weights = zip(m.weight_names, m.before or [], strict=False)
                jobs_tensors += [t for n, t in weights if self._drawn(m.weight_numels[n])]
            jobs_tensors += list(activation_values.values())
            if self.sharded:
                parts += sharded.histogram_parts(jobs_tensors)
            else:
                parts += [(t, sharded.SAME) for t in histograms.device_stats(jobs_tensors)]

        host = self._to_host(parts)
        measured = [(m.optimizer_index, stats.read(m, host)) for m in taken.measurements]
        scale = next((v.scale for _, v in measured if v.scale != 1.0), 1.0)
        clipped_total = next(host)[0] / scale if clipped else None
        loss_value = next(host)[0] if loss is not None and taken.write_scalars else None
        bad_step = next(host)[0] if first_bad is not None else math.inf
        activation_stats = {
            self.tags.layer(layer): dict(zip(STATS, next(host), strict=True))
            for layer in activations
        }
        if activation_stats:  # what the probe decides its next measured step from
            shares = [values[stat] for values in activation_stats.values() for stat in STATS[1:]]
            self.probe.largest_share = max(shares)
        carried_share = 0.0 if followed else None
        if carried is not None:
            carried_norm, fresh_norm = next(host)
            ok = math.isfinite(carried_norm) and math.isfinite(fresh_norm) and fresh_norm > 0
            carried_share = carried_norm / fresh_norm if ok else None
        amp_scale_value = next(host)[0] if amp_scale is not None else None
        steps = self.buffer.read(host, self.sharded) if buffered else []
        every_stepped = len(trainer.optimizers) <= 1 or len({i for i, _ in measured}) == len(
            trainer.optimizers
        )
        scalars = step_scalars(
            measured,
            self.tags,
            self.norm_types,
            every_stepped,
            clipped_total,
            weight_norms=self.log_weight_norms,
            update_ratios=self.log_update_ratio,
        )
        if taken.write_scalars:
            alerts = self.health.observe(
                Observation(
                    step=taken.step,
                    layer_norms=scalars.layer_norms,
                    totals=scalars.totals,
                    nonfinite=scalars.nonfinite,
                    update_ratios=scalars.update_ratios,
                    loss=loss_value,
                    first_bad_step=int(bad_step) if math.isfinite(bad_step) else None,
                    overflow_expected=scaler is not None,
                    no_gradient=taken.no_gradient,
                    not_optimized=taken.not_optimized,
                    activations=activation_stats,
                    amp_scale=amp_scale_value,
                    weight_norms=scalars.weight_norms,
                    carried_gradient=carried_share,
                    low_precision=self.low_precision,
                    rounded_away=scalars.rounded_away,
                    zero_eps=self.zero_eps,
                )
            )
            if self.on_nonfinite == "stop" and self.health.nonfinite_now():
                trainer.should_stop = True
        else:
            alerts = []
        events, found, spike_alerts = self._every_step_events(trainer, steps)
        alerts += spike_alerts
        hists = []
        if jobs_tensors and self.tb is not None and (self.sharded or trainer.is_global_zero):
            # Under sharding every rank bins its shards: the counts are summed over the ranks.
            jobs = self._histogram_jobs(taken.measurements, measured)
            # Their norms are not among the scalars: NaN has them taken with the bins.
            jobs += [
                histograms.Job(f"activation_hist/{layer}", values, math.nan)
                for layer, values in activation_values.items()
            ]
            binned = sharded.histograms if self.sharded else histograms.histograms
            hists = binned(jobs, host, self.bins)
        if not trainer.is_global_zero:
            # Other ranks hold the same all-reduced gradients and loss: they keep the same alert
            # state (so `should_stop` agrees on every rank without a collective of its own) but
            # write nothing.
            return
        self._raise_alerts(alerts)
        # Every step's events but this one's, which is written in full below.
        events = [e for e in events if e[0] != taken.step]
        writers.write_scalar_steps(trainer.loggers, events)
        if taken.write_scalars:
            for layer, values in activation_stats.items():
                for stat in STATS[1:]:
                    scalars.metrics[f"activation/{stat}/{layer}"] = values[stat]
            scalars.metrics.update(self.spikes.tags(taken.step, found))
            log10 = first_screen.log10_scalars(scalars.layer_norms, scalars.update_ratios)
            writers.write_scalars(trainer.loggers, scalars.metrics, taken.step, log10)
        if hists:
            writers.write_histograms(self.tb, hists, taken.step)

    def flush_steps(self, trainer: "pl.Trainer") -> None:
        """every_step: the steps not yet written (after the last logging step), in a transfer
        of their own; their spikes checked, their alerts raised."""
        if not self.buffer.records:
            return
        host = self._to_host(self.buffer.parts(self.sharded))
        steps = self.buffer.read(host, self.sharded)
        events, _, alerts = self._every_step_events(trainer, steps)
        if not trainer.is_global_zero:
            return
        self._raise_alerts(alerts)
        writers.write_scalar_steps(trainer.loggers, events)

    def _to_host(self, parts: list[tuple[Tensor, sharded.Across]]) -> Iterator[list[float]]:
        """The parts on the host in one transfer; under FSDP2, combined over the ranks in one
        all-reduce first."""
        if self.sharded:
            return stats.to_host(sharded.all_reduce(parts))
        return stats.to_host([t for t, _ in parts])

    def _every_step_events(
        self, trainer: "pl.Trainer", steps: list[StepValues]
    ) -> tuple[list[ScalarStep], dict[int, dict[str, float]], list[Alert]]:
        """every_step: each step's event, its spikes, and their alerts, recorded with the others
        (``gradients.json``)."""
        spikes_ = None if self.on_spike == "off" else self.spikes
        events, found, alerts = checked_events(
            steps, self.tags, self.norm_types, len(trainer.optimizers), spikes_
        )
        for alert in alerts:
            self.health.add(alert)
        return events, found, alerts

    def _raise_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            rank_zero_warn(GradientAlert(f"GradientMonitor: {alert.line()}", alert))
            if self.tb is not None:
                writers.write_alert(self.tb, alert)

    def _histogram_jobs(
        self, measurements: list[Measurement], measured: list[tuple[int, stats.HostValues]]
    ) -> list[histograms.Job]:
        """The step's gradient and weight copies to bin, in ``device_stats``'s order."""
        jobs = []
        for m, (_, values) in zip(measurements, measured, strict=True):
            scale = values.scale
            for name, copy in zip(m.grad_names, m.grad_copies or [], strict=True):
                numel = m.grad_numels[name]
                if not self._drawn(numel):
                    continue
                # The norm of the copy as it is (still scaled where the values are).
                norm = values.grad_norms[2.0][name] * scale
                tag = f"grad_hist/{self.tags.param(name)}"
                jobs.append(histograms.Job(tag, copy, norm, scale, numel=numel))
            for name, copy in zip(m.weight_names, m.before or [], strict=True):
                numel = m.weight_numels[name]
                if not self._drawn(numel):
                    continue
                norm = values.weight_norms[name]
                tag = f"weight_hist/{self.tags.param(name)}"
                jobs.append(histograms.Job(tag, copy, norm, numel=numel))
        return jobs

    def _drawn(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` values (the whole tensor's, under sharding: every rank
        decides alike) gets a histogram: below ``histogram_min_values`` values it would be a few
        spikes with overlapping labels, and its norm scalars say the same."""
        return numel >= self.histogram_min_values


def logged_loss(trainer: "pl.Trainer", loss: Tensor) -> Tensor:
    """The step's loss as ``self.log(..., sync_dist=True)`` logs it: under data parallelism
    the mean of the ranks' losses (one small all-reduce, on logging steps only), so every
    rank's alerts quote the logged loss and fire at the single-process run's steps. Like
    DDP's gradient average, the mean does not weight the ranks by their shares of the batch.
    """
    loss = loss.detach().reshape(1)
    if trainer.world_size == 1:
        return loss
    # A copy (all_reduce is in place; the step's output is the module's), in float32 or
    # float64 as Lightning reduces logged values.
    dtype = loss.dtype if loss.dtype in (torch.float32, torch.float64) else torch.float32
    loss = loss.to(dtype, copy=True)
    torch.distributed.all_reduce(loss)
    return loss.div_(trainer.world_size)
