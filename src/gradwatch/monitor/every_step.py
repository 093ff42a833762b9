"""Every step's gradient norms, kept on the gradients' device between two logging steps.

With ``every_step=True`` each optimizer step adds one :class:`StepRecord`: the norms of its
gradients (one foreach kernel per norm type, stacked: no host sync), and after the step the loss
and, when Lightning clips, the clipped total. The records travel to the host with the logging
step's one transfer (under FSDP2, in its one all-reduce), and every step gets its own event with
the tags a logging step writes for gradient norms (``grad_norm/...``, ``grad_norm_<p>/...``,
``grad_norm/total_clipped``, ``grad_norm_log10/...``), computed by the same code
(:func:`gradwatch.monitor.scalars.step_scalars`) from the same norms. What needs more than a norm
of the gradient stays at the logging cadence: weight norms and update ratios (a copy of the
weights before every step), NaN/Inf counts, activation statistics and histograms.
"""

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.monitor import first_screen, sharded
from gradwatch.monitor.alerts import Alert
from gradwatch.monitor.names import TOTAL, TOTAL_CLIPPED, Tags, stored_values
from gradwatch.monitor.scalars import family, step_scalars
from gradwatch.monitor.sharded import Across
from gradwatch.monitor.spikes import SpikeWatch
from gradwatch.monitor.stats import (
    HostValues,
    combine,
    concat,
    foreach_norms,
    grouped,
    total_norm,
)
from gradwatch.monitor.writers import ScalarStep


@dataclass(slots=True)
class StepRecord:
    """One optimizer's gradients at one step, on the device."""

    step: int
    wall_time: float  # when it was taken: TensorBoard's time axis
    optimizer_index: int
    grad_names: list[str]
    norms: Tensor  # per norm type (the buffer's order), one norm per gradient
    scale: Tensor | None  # the GradScaler's scale where the gradients are still scaled
    clipped: Tensor | None = None  # the total after Lightning's clipping
    loss: Tensor | None = None  # the step's loss, on the last record of the step


@dataclass(slots=True)
class StepValues:
    """One step's values on the host: per optimizer that stepped, its parameters' names and
    their norms (per norm type, one per name, divided by the AMP scale), the clipped total and
    the loss."""

    step: int
    wall_time: float
    norms: list[tuple[int, list[str], list[float]]]  # (optimizer index, names, norms)
    clipped_total: float | None
    loss: float | None


class StepBuffer:
    """The records since the last transfer."""

    def __init__(self, norm_types: list[float]) -> None:
        self.norm_types = norm_types
        self.records: list[StepRecord] = []
        # The gradients of the step being taken, until the clipped total is taken from them.
        self._grads: list[Tensor] = []
        # Per optimizer and set of parameters with a gradient (None: all of them), worked out
        # once: the names in foreach order, the order itself (grouped by device and dtype), and
        # whether the gradients are plain: dense, not empty, of one device and dtype, in the
        # parameters' order (one foreach kernel per norm type, nothing to reorder or take).
        self._layouts: dict[tuple, tuple[list[str], list[int], bool]] = {}

    def record(
        self,
        step: int,
        optimizer_index: int,
        params: list[Tensor],
        names: Callable[[], list[str]],
        scale: Tensor | None,
    ) -> StepRecord | None:
        """The norms of ``params``' gradients at ``step`` (``names()``: the parameters' names,
        asked for only when the set with a gradient changes; frozen ones count as without);
        ``None`` when none has one."""
        grads = [p.grad if p.requires_grad else None for p in params]
        present = None  # the common case: every parameter has a gradient
        if any(g is None for g in grads):
            present = tuple(i for i, g in enumerate(grads) if g is not None)
            if not present:
                return None
        key = (optimizer_index, present)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _layout(grads, present, names())
        grad_names, order, plain = layout
        if plain:
            grads = [grads[i] for i in order] if present else grads
            norms = torch.stack(
                [n for ord_ in self.norm_types for n in torch._foreach_norm(grads, ord_)]
            )
        else:
            grads = [stored_values(grads[i]) for i in order]
            norms = concat([n for ord_ in self.norm_types for n in foreach_norms(grads, ord_)])
        # Few objects kept per step, one tensor of norms among them: a run's every step adds up,
        # and every object that outlives a few steps brings Python's full garbage collection of
        # the whole process (Lightning's and torch's objects, a tenth of a second) nearer.
        rec = StepRecord(
            step=step,
            wall_time=time.time(),
            optimizer_index=optimizer_index,
            grad_names=grad_names,
            norms=norms,
            # Copied: `scaler.update()` changes the scale in place after the step.
            scale=None if scale is None else scale.detach().clone().reshape(1),
        )
        self.records.append(rec)
        self._grads += grads
        return rec

    def after_step(self, step: int, loss: Tensor | None, clipped: bool) -> None:
        """After the optimizer step of ``step``: its loss, and (Lightning clips after the
        measuring hook, in place) the total of the clipped gradients."""
        mine = []
        for r in reversed(self.records):
            if r.step != step:
                break
            mine.append(r)
        if not mine:
            return
        if clipped:
            mine[0].clipped = total_norm(self._grads)
        self._grads = []
        if loss is not None and loss.numel() == 1:
            mine[0].loss = loss.detach()

    def parts(self, is_sharded: bool) -> list[tuple[Tensor, Across]]:
        """The records' tensors for the transfer, a few tensors for all of them, each with how
        it combines over the ranks (FSDP2: each rank holds norms of its shards, the loss is the
        mean over the ranks); :meth:`read` takes them back in this order."""
        records = self.records
        if not is_sharded:
            parts = [(torch.cat([r.norms for r in records]), sharded.SAME)]
        else:  # one part per norm type of every record: a p-norm combines as a p-norm
            parts = []
            for r in records:
                n = len(r.grad_names)
                for i, ord_ in enumerate(self.norm_types):
                    parts.append((r.norms[i * n : (i + 1) * n], sharded.norm(ord_)))
        scales = [r.scale for r in records if r.scale is not None]
        clipped = [r.clipped for r in records if r.clipped is not None]
        losses = [r.loss for r in records if r.loss is not None]
        if scales:
            parts.append((torch.cat(scales), sharded.SAME))
        if clipped:
            parts.append((torch.cat(clipped), sharded.norm(2.0) if is_sharded else sharded.SAME))
        if losses:
            parts.append((torch.stack(losses), sharded.MEAN if is_sharded else sharded.SAME))
        return parts

    def read(self, host: Iterator[list[float]], is_sharded: bool) -> list[StepValues]:
        """The records' values, one :class:`StepValues` per step in order; empties the buffer."""
        records, self.records = self.records, []
        if not is_sharded:
            flat = next(host)
            norms, start = [], 0
            for r in records:
                size = len(r.grad_names) * len(self.norm_types)
                norms.append(flat[start : start + size])
                start += size
        else:
            norms = [[v for _ in self.norm_types for v in next(host)] for _ in records]
        scales = iter(next(host) if any(r.scale is not None for r in records) else [])
        clipped = iter(next(host) if any(r.clipped is not None for r in records) else [])
        losses = iter(next(host) if any(r.loss is not None for r in records) else [])
        steps: list[StepValues] = []
        for r, values in zip(records, norms, strict=True):
            scale = next(scales) if r.scale is not None else 1.0
            if scale != 1.0:
                values = [v / scale for v in values]
            if not steps or steps[-1].step != r.step:
                steps.append(StepValues(r.step, r.wall_time, [], None, None))
            last = steps[-1]
            last.norms.append((r.optimizer_index, r.grad_names, values))
            if r.clipped is not None:
                last.clipped_total = next(clipped) / scale
            if r.loss is not None:
                last.loss = next(losses)
        return steps


def _layout(
    grads: list[Tensor | None], present: tuple[int, ...] | None, names: list[str]
) -> tuple[list[str], list[int], bool]:
    indices = list(present if present is not None else range(len(grads)))
    taken = [grads[i] for i in indices]
    order, _ = grouped(indices, [stored_values(g) for g in taken])
    plain = len({(g.device, g.dtype) for g in taken}) == 1 and all(
        g.layout == torch.strided and not sharded.is_sharded(g) and g.numel() for g in taken
    )
    return [names[i] for i in order], order, plain


def checked_events(
    steps: list[StepValues],
    tags: Tags,
    norm_types: list[float],
    num_optimizers: int,
    spikes: SpikeWatch | None,
) -> tuple[list[ScalarStep], dict[int, dict[str, float]], list[Alert]]:
    """Each step's event (:func:`step_events`) with the tags of its spikes, where ``spikes``
    checks them; the spikes found (robust z-scores by step and quantity) and their alerts."""
    totals, events = step_events(steps, tags, norm_types, num_optimizers)
    if spikes is None or not steps:
        return events, {}, []
    losses = [sv.loss for sv in steps]
    found, alerts = spikes.observe([sv.step for sv in steps], totals, losses)
    events = [
        (step, wall, {**metrics, **spikes.tags(step, found)} if step in found else metrics, log10)
        for step, wall, metrics, log10 in events
    ]
    return events, found, alerts


def step_events(
    steps: list[StepValues], tags: Tags, norm_types: list[float], num_optimizers: int
) -> tuple[list[float], list[ScalarStep]]:
    """Each step's total L2 norm (what spikes read) and its event for
    :func:`gradwatch.monitor.writers.write_scalar_steps`: the metrics a logging step would write
    for these norms (:func:`step_scalars`'s) and the first screen's log10 copies."""
    totals, events = [], []
    plans: dict[int, _Plan] = {}
    for sv in steps:
        if len(sv.norms) == 1 and num_optimizers <= 1:
            _, names, values = sv.norms[0]
            plan = plans.get(id(names))
            if plan is None:
                plan = plans[id(names)] = _Plan(names, tags, norm_types)
            metrics, log10, total = plan.scalars(values, sv.clipped_total)
        else:
            metrics, log10, total = _general_scalars(sv, tags, norm_types, num_optimizers)
        totals.append(total)
        events.append((sv.step, sv.wall_time, metrics, log10))
    return totals, events


def _general_scalars(
    sv: StepValues, tags: Tags, norm_types: list[float], num_optimizers: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """Several optimizers: :func:`step_scalars` itself, totals per optimizer and all."""
    measured = []
    for index, names, values in sv.norms:
        n = len(names)
        norms = {
            ord_: dict(zip(names, values[i * n : (i + 1) * n], strict=True))
            for i, ord_ in enumerate(norm_types)
        }
        measured.append((index, HostValues(norms, {}, {}, {})))
    every_stepped = num_optimizers <= 1 or len(measured) == num_optimizers
    scalars = step_scalars(
        measured,
        tags,
        norm_types,
        every_stepped,
        sv.clipped_total,
        weight_norms=False,
        update_ratios=False,
    )
    totals = scalars.totals
    total = totals["total"] if "total" in totals else combine(list(totals.values()), 2.0)
    return scalars.metrics, first_screen.log10_scalars(scalars.layer_norms, {}), total


class _Plan:
    """One optimizer's parameters (in foreach order) as :func:`step_scalars` writes them, worked
    out once: the tag of each value, the members of each layer, the total. :meth:`scalars` then
    does step_scalars's arithmetic (a layer's norm from its parameters' in their order, the total
    from the layers' in theirs, ``combine``) without its dictionaries: every step of every_step
    goes through it."""

    def __init__(self, names: list[str], tags: Tags, norm_types: list[float]) -> None:
        layers: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            layers.setdefault(tags.layer_of_param(name), []).append(i)
        self.layers = list(layers.items())
        self.norm_types = [(ord_, family(ord_)) for ord_ in norm_types]
        self.n = len(names)
        self.param_tags = {
            fam: [f"{fam}/{tags.param(name)}" for name in names] for _, fam in self.norm_types
        }
        self.layer_tags = {
            fam: [f"{fam}/{lay}" for lay, _ in self.layers] for _, fam in self.norm_types
        }
        self.log10_tags = [f"{first_screen.GRAD_NORM_LOG10}/{lay}" for lay, _ in self.layers]

    def scalars(
        self, values: list[float], clipped_total: float | None
    ) -> tuple[dict[str, float], dict[str, float], float]:
        metrics: dict[str, float] = {}
        log10: dict[str, float] = {}
        total = math.nan
        for i, (ord_, fam) in enumerate(self.norm_types):
            vs = values[i * self.n : (i + 1) * self.n]
            metrics.update(zip(self.param_tags[fam], vs, strict=True))
            layer_norms = [combine([vs[j] for j in members], ord_) for _, members in self.layers]
            metrics.update(zip(self.layer_tags[fam], layer_norms, strict=True))
            metrics[f"{fam}/{TOTAL}"] = combined = combine(layer_norms, ord_)
            if ord_ == 2.0:
                total = combined
                for tag, v in zip(self.log10_tags, layer_norms, strict=True):
                    if v > 0 and math.isfinite(v):
                        log10[tag] = math.log10(v)
        if clipped_total is not None:
            metrics[f"grad_norm/{TOTAL_CLIPPED}"] = clipped_total
        return metrics, log10, total
