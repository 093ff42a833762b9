"""Gradient and weight statistics on the gradients' device, and the one transfer that brings them
to the host.

A logging step measures each optimizer's parameters in ``on_before_optimizer_step`` (after
accumulation, all-reduce and AMP unscaling, before clipping and the step): :func:`measure` leaves
every value on the device. After the step, :func:`update_norms` adds the norms of the weights'
change, and :func:`to_host` moves everything in one ``.tolist()``. Norms of tensors of one device
and dtype are one foreach kernel; sparse gradients are measured by their stored values.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradwatch.monitor.names import stored_values
from gradwatch.monitor.sharded import SAME, SUM, Across, is_sharded, norm


@dataclass
class Measurement:
    """One optimizer's parameters at a logging step, measured before its step; tensors on device.

    Parameters without a gradient are in ``weight_names`` but not in ``grad_names``: no gradient
    is not a small gradient, and nothing is logged for it.
    """

    optimizer_index: int
    grad_names: list[str]
    grads: list[Tensor]  # the gradients (of a sparse one, its stored values)
    norms: dict[float, Tensor]  # per norm type, one norm per gradient
    nonfinite: Tensor | None  # NaN/Inf counts per gradient, taken before clipping can change them
    weight_names: list[str]
    weights: list[Tensor]  # the parameters themselves, detached
    weight_norms: Tensor | None
    # By name, how many values were measured: a sparse gradient's stored values; under sharding,
    # the whole tensor's, not the shard's (so that every rank decides alike what to draw).
    grad_numels: dict[str, int]
    weight_numels: dict[str, int]
    before: list[Tensor] | None  # copies of the weights before the step
    grad_copies: list[Tensor] | None  # copies of the gradients as measured, for histograms
    scale: Tensor | None  # the GradScaler's scale, where the gradients are still scaled
    # False when the monitor itself kept the optimizer from stepping (``on_spike="skip"``):
    # the weights then stay put by design, and no update counts as rounded away.
    stepped: bool = True


@dataclass
class HostValues:
    """A measurement's values on the host, by parameter name (norms divided by the AMP scale)."""

    grad_norms: dict[float, dict[str, float]]
    nonfinite: dict[str, float]
    weight_norms: dict[str, float]
    update_norms: dict[str, float]
    scale: float = 1.0  # the AMP scale the gradient norms were divided by
    # 16-bit weights: (values whose update was rounded away, values the gradient asked to move)
    rounded_away: dict[str, tuple[float, float]] = field(default_factory=dict)


def measure(
    optimizer_index: int,
    params: list[Tensor],
    names: list[str],
    norm_types: list[float],
    count_nonfinite_now: bool,
    weight_norms: bool,
    snapshot: bool,
    copy_grads: bool,
    scale: Tensor | None,
) -> Measurement:
    """Takes the statistics of ``params`` that must be taken before clipping and the step.

    Args:
        count_nonfinite_now: count NaN/Inf values on the device now (clipping follows and would
            rescale them in place); otherwise they are counted later, only where a norm is not
            finite.
        weight_norms: measure the weights' norms.
        snapshot: keep a copy of the weights (update ratios, weight histograms).
        copy_grads: keep a copy of the gradients (histograms).
        scale: the GradScaler's scale when the gradients are still scaled (fused optimizers);
            copied, since ``scaler.update()`` changes it in place before the transfer.
    """
    with_grad = [(n, p.grad) for n, p in zip(names, params, strict=True) if p.grad is not None]
    stored = [stored_values(g) for _, g in with_grad]
    grad_names, grads = grouped([n for n, _ in with_grad], stored)
    # Under sharding, this rank's shards: views that the optimizer's step updates in place.
    weight_names, weights = grouped(names, [stored_values(p.detach()) for p in params])
    norm_of = {ord_: concat(foreach_norms(grads, ord_)) for ord_ in norm_types} if grads else {}
    nonfinite = None
    if count_nonfinite_now and grads:
        nonfinite = torch.stack([count_nonfinite(g).to(norm_of[2.0].device) for g in grads])
    return Measurement(
        optimizer_index=optimizer_index,
        grad_names=grad_names,
        grads=grads,
        norms=norm_of,
        nonfinite=nonfinite,
        weight_names=weight_names,
        weights=weights,
        weight_norms=concat(foreach_norms(weights, 2.0)) if weight_norms and weights else None,
        grad_numels={
            n: g.numel() if is_sharded(g) else v.numel()
            for (n, g), v in zip(with_grad, stored, strict=True)
        },
        weight_numels={n: p.numel() for n, p in zip(names, params, strict=True)},
        before=_copy(weights) if snapshot else None,
        grad_copies=_copy(grads) if copy_grads else None,
        scale=None if scale is None else scale.detach().clone().reshape(1),
    )


def device_parts(m: Measurement) -> list[tuple[Tensor, Across]]:
    """The measurement's tensors for the transfer, after the step: norms, counts, weight norms,
    and the norms of the weights' change, each with how it combines over the ranks when the
    parameters are sharded. :func:`read` takes them back in this order."""
    parts = [(m.norms[ord_], norm(ord_)) for ord_ in m.norms]
    if m.nonfinite is not None:
        parts.append((m.nonfinite, SUM))
    if m.weight_norms is not None:
        parts.append((m.weight_norms, norm(2.0)))
    if m.before is not None and m.weight_norms is not None:
        change = torch._foreach_sub(m.weights, m.before)
        parts.append((concat(foreach_norms(change, 2.0)), norm(2.0)))
        weights = _rounded_away_weights(m)
        if weights:
            parts.append((_rounded_away_counts(weights), SUM))
    if m.scale is not None:
        parts.append((m.scale, SAME))
    return parts


# Weights of these dtypes are 1 part in 128 (bfloat16) or 1024 (float16) apart: a step of less
# than half that rounds back to the same weight.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _rounded_away_weights(m: Measurement) -> list[tuple[str, Tensor, Tensor, Tensor]]:
    """(name, weight, its copy before the step, gradient) of each 16-bit weight with a dense
    gradient, when the optimizer stepped: those whose updates :func:`_rounded_away_counts`
    counts, in the order :func:`read` takes them back."""
    if not m.stepped or m.before is None:
        return []
    low = [
        (n, w, b)
        for n, w, b in zip(m.weight_names, m.weights, m.before, strict=True)
        if w.dtype in LOW_PRECISION
    ]
    if not low:  # the common case
        return []
    grads = dict(zip(m.grad_names, m.grads, strict=True))
    return [(n, w, b, grads[n]) for n, w, b in low if n in grads and grads[n].shape == w.shape]


def _rounded_away_counts(weights: list[tuple[str, Tensor, Tensor, Tensor]]) -> Tensor:
    """After the step, for each weight: how many of its values the step left exactly as they
    were although the gradient asked them to move (not exactly 0: under Adam a value with a
    zero gradient moves too, by its moments), and how many it asked to move; the pairs in one
    tensor."""
    counts = []
    for _, w, before, grad in weights:
        asked = grad != 0
        counts += [(asked & (w == before)).sum(), asked.sum()]
    return torch.stack(counts).to(exact_dtype(counts[0].device))


def read(m: Measurement, host: Iterator[list[float]]) -> HostValues:
    """The measurement's values from :func:`to_host`'s lists, in :func:`device_parts`'s order."""
    norms = {ord_: next(host) for ord_ in m.norms}
    nonfinite = next(host) if m.nonfinite is not None else None
    weight_norms = next(host) if m.weight_norms is not None else []
    updates, rounded_away = [], {}
    if m.before is not None and m.weight_norms is not None:
        updates = next(host)
        names = [name for name, *_ in _rounded_away_weights(m)]
        if names:
            pairs = next(host)
            rounded_away = {name: (pairs[2 * i], pairs[2 * i + 1]) for i, name in enumerate(names)}
    scale = next(host)[0] if m.scale is not None else 1.0
    if nonfinite is None:
        # Counted only where the norm says there is something to count (a transfer more, on
        # such steps only); every other gradient has none.
        nonfinite = [
            float(count_nonfinite(g).item()) if not math.isfinite(n) else 0.0
            for g, n in zip(m.grads, norms.get(2.0, []), strict=True)
        ]
    return HostValues(
        grad_norms={
            ord_: {n: v / scale for n, v in zip(m.grad_names, values, strict=True)}
            for ord_, values in norms.items()
        },
        nonfinite=dict(zip(m.grad_names, nonfinite, strict=True)),
        weight_norms=dict(zip(m.weight_names, weight_norms, strict=False)),
        update_norms=dict(zip(m.weight_names, updates, strict=False)),
        scale=scale,
        rounded_away=rounded_away,
    )


def total_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of every gradient together, as one 1-element tensor (no transfer)."""
    return torch.linalg.vector_norm(concat(foreach_norms(grads, 2.0))).reshape(1)


def to_host(parts: list[Tensor]) -> Iterator[list[float]]:
    """The one device-to-host transfer of a logging step: every part (1-D) as a list of floats,
    in order. float32 norms join float64 counts as float64: a float32's value is exact either way.
    """
    if not parts:
        return iter([])
    device = parts[0].device
    flat = torch.cat([p.to(device) for p in parts]).tolist()  # the transfer (a host sync)
    out, start = [], 0
    for p in parts:
        out.append(flat[start : start + p.numel()])
        start += p.numel()
    return iter(out)


def combine(norms: list[float], ord_: float) -> float:
    """The p-norm of a concatenation from the p-norms of its parts (for L2: the norm of norms)."""
    if not norms:
        return 0.0
    if math.isinf(ord_):
        return max(norms)
    if ord_ == 2.0:  # every layer of every step under every_step: the fast spelling
        return math.sqrt(math.fsum([v * v for v in norms]))  # NaN in, NaN out
    return math.fsum([v**ord_ for v in norms]) ** (1.0 / ord_)


def count_nonfinite(tensor: Tensor) -> Tensor:
    return tensor.isfinite().logical_not().sum().to(exact_dtype(tensor.device))


def exact_dtype(device: torch.device) -> torch.dtype:
    """Counts travel as floats: float64 holds them exactly (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def any_nonfinite(grads: list[Tensor]) -> Tensor:
    """Whether any gradient holds NaN or Inf, as a tensor on the gradients' device (no sync)."""
    return concat(foreach_norms(grads, 2.0)).isfinite().logical_not().any()


def grouped(names: list[str], tensors: list[Tensor]) -> tuple[list[str], list[Tensor]]:
    """Names and tensors reordered so that tensors of one device and dtype are together: each
    group is one foreach kernel."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    order = [i for members in groups.values() for i in members]
    return [names[i] for i in order], [tensors[i] for i in order]


def foreach_norms(tensors: list[Tensor], ord_: float) -> list[Tensor]:
    """One norm per tensor, one foreach kernel per run of the same device and dtype; half
    precision sums in fp32 (a sum of squares overflows fp16 at 256)."""
    out: list[Tensor] = []
    start = 0
    while start < len(tensors):
        first = tensors[start]
        end = start + 1
        while end < len(tensors) and (tensors[end].device, tensors[end].dtype) == (
            first.device,
            first.dtype,
        ):
            end += 1
        low = first.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if low else None
        # An empty tensor (a rank's shard of a small FSDP2 parameter) has the norm of one zero,
        # and the inf norm of an empty tensor has no identity in torch.
        run = [t if t.numel() else t.new_zeros(1) for t in tensors[start:end]]
        out += torch._foreach_norm(run, ord_, dtype=dtype)
        start = end
    return out


def concat(scalars: list[Tensor]) -> Tensor:
    """0-d tensors as one 1-D tensor on the first one's device (of their promoted dtype)."""
    try:
        return torch.stack(scalars)
    except RuntimeError:  # on several devices: rare, and then a copy each
        device = scalars[0].device
        return torch.stack([s.to(device) for s in scalars])


def _copy(tensors: list[Tensor]) -> list[Tensor]:
    # One foreach op per device and dtype; the copies are the caller's to overwrite.
    return list(torch._foreach_mul(tensors, 1)) if tensors else []
