"""The whole model's statistics from its shards, under FSDP2 (Lightning's ModelParallelStrategy
with ``fully_shard``): every parameter and its gradient is a DTensor, and each rank holds some
rows of it (possibly none).

Each rank measures only its own shards; what the whole tensor's statistic is follows from one
reduction over the ranks, declared with each value as it is made (:class:`Across`): a p-norm is
the p-th root of the sum over ranks of each shard's sum of ``|x|^p``, a count or a sum is the
sum. All such values of a logging step travel in one float64 tensor: one all-reduce (SUM).
A maximum cannot ride in a sum, so the values that need one (inf norms, the first non-finite
step of ``on_nonfinite="stop"``, histogram ranges) go in a second all-reduce (MAX, a minimum as
a negated maximum), made only on the steps that have such a value. A histogram step then sums
its bucket counts, binned over the shared range, in one more.

The sums are exact for any layout whose placements are all ``Shard`` over a mesh of every rank
(each value lives on exactly one rank): :func:`check_layout` refuses any other (a replicated or
partial placement, as tensor parallelism makes, would be counted more than once).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradwatch.monitor.histograms import Histogram, Job, binned, flat_float

try:  # torch builds without distributed support have no DTensor, and nothing sharded
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None


@dataclass(frozen=True)
class Across:
    """How one part's values combine over the ranks: ``sum``, ``mean`` (the loss, as
    ``self.log(sync_dist=True)`` takes it), ``max``, ``min``, ``norm`` (of order ``p``; each
    rank gives its shard's p-norm), or ``same`` (every rank holds the whole value already)."""

    how: str
    p: float = 2.0


SUM, MEAN, MAX, MIN, SAME = (Across(how) for how in ("sum", "mean", "max", "min", "same"))


def norm(p: float) -> Across:
    return Across("norm", p)


def is_sharded(tensor: Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view of it, which the optimizer updates in place); any
    other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_layout(module: nn.Module, world_size: int) -> bool:
    """Whether the module's parameters are sharded (DTensors); raises ValueError for a layout
    whose statistics the sums over ranks would get wrong: a parameter held whole by every rank
    next to sharded ones, a placement other than ``Shard``, or a mesh of fewer ranks than all."""
    named = list(module.named_parameters())
    sharded = [(n, p) for n, p in named if is_sharded(p)]
    if not sharded:
        return False
    for name, p in named:
        if not is_sharded(p):
            raise ValueError(
                f"GradientMonitor: {name} is not sharded while other parameters are: apply"
                " fully_shard to the root module too, so that every parameter is a DTensor"
            )
        placements = tuple(p.placements)
        ranks = p.device_mesh.size()
        if not all(isinstance(pl, Shard) for pl in placements) or ranks != world_size:
            raise ValueError(
                f"GradientMonitor: {name} is laid out as {placements} over {ranks}"
                f" of {world_size} ranks; the monitor sums each rank's shard, which is exact only"
                " when every parameter is sharded (Shard placements) over all ranks, as"
                " fully_shard does (tensor parallelism, replicated parameters: not supported)"
            )
    return True


def all_reduce(parts: list[tuple[Tensor, Across]]) -> list[Tensor]:
    """Every part (1-D) combined over the ranks as its :class:`Across` says, in order, as float64
    on the parts' device: one SUM all-reduce, and one MAX all-reduce where a part needs it."""
    if not parts:
        return []
    device = parts[0][0].device
    world = torch.distributed.get_world_size()
    summed: list[Tensor] = []
    maxed: list[Tensor] = []
    for values, across in parts:
        if across.how == "same":
            continue
        x = values.to(device, torch.float64)
        if across.how in ("sum", "mean"):
            summed.append(x)
        elif across.how == "norm" and not math.isinf(across.p):
            summed.append(x.pow(across.p))  # NaN and Inf stay NaN and Inf
        else:  # max, min, and the inf norm (a max of |g|)
            # A max of NaN is whatever the back-end makes of it: NaN travels as a count in the
            # sum instead, and is put back after.
            nan = x.isnan()
            summed.append(nan.to(torch.float64))
            maxed.append(torch.where(nan, -math.inf, -x if across.how == "min" else x))
    sums = _all_reduce(summed, torch.distributed.ReduceOp.SUM)
    maxima = _all_reduce(maxed, torch.distributed.ReduceOp.MAX)
    out = []
    for values, across in parts:
        if across.how == "same":
            out.append(values.to(device, torch.float64))
        elif across.how == "sum":
            out.append(next(sums))
        elif across.how == "mean":
            out.append(next(sums) / world)
        elif across.how == "norm" and not math.isinf(across.p):
            out.append(next(sums).pow(1.0 / across.p))
        else:
            nan, peak = next(sums), next(maxima)
            peak = -peak if across.how == "min" else peak
            out.append(torch.where(nan > 0, math.nan, peak))
    return out


def _all_reduce(parts: list[Tensor], op: "torch.distributed.ReduceOp") -> Iterator[Tensor]:
    """The parts reduced over the ranks in one collective, as an iterator over them."""
    if not parts:
        return iter([])
    packed = torch.cat(parts)
    torch.distributed.all_reduce(packed, op=op)
    return iter(packed.split([p.numel() for p in parts]))


def histogram_parts(tensors: list[Tensor]) -> list[tuple[Tensor, Across]]:
    """Per tensor (this rank's shard), over its finite values: the smallest, the largest, how
    many, their sum and sum of squares, each with how it combines over the ranks (an empty or
    all-NaN shard gives +inf and -inf, which the other ranks' values win over)."""
    if not tensors:
        return []
    rows = []
    for t in tensors:
        x = flat_float(t)
        finite = x.isfinite()
        zeroed = torch.where(finite, x, 0.0)
        lo = torch.where(finite, x, math.inf).amin() if x.numel() else x.new_full((), math.inf)
        hi = torch.where(finite, x, -math.inf).amax() if x.numel() else x.new_full((), -math.inf)
        rows.append(
            torch.stack([lo, hi, finite.sum().to(x.dtype), zeroed.sum(), zeroed.square().sum()])
        )
    table = torch.stack(rows).double().T  # one row per statistic
    return [(table[0], MIN), (table[1], MAX), (table[2], SUM), (table[3], SUM), (table[4], SUM)]


def histograms(jobs: list[Job], host: Iterator[list[float]], bins: int) -> list[Histogram]:
    """Every job's histogram of the whole tensor, from :func:`histogram_parts`'s values combined
    over the ranks (read from ``host``): each rank bins its shard over the shared range, and the
    counts are summed over the ranks."""
    if not jobs:
        return []
    columns = [next(host) for _ in range(5)]  # min, max, count, sum, sum of squares
    return binned(jobs, list(zip(*columns, strict=True)), bins, sum_over_ranks=_sum_counts)


def _sum_counts(counts: Tensor) -> Tensor:
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    return counts
