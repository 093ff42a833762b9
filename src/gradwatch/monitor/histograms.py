"""Histograms of gradients and weights: ``torch.histc`` over each tensor's finite range, on its
device, into TensorBoard's bucket form.

The caller owns the tensors it passes (copies taken before the step): binning overwrites them.
Their min, max and sum join the logging step's one transfer (:func:`device_stats`); the count and
the sum of squares follow from the numel and the norm unless a value is NaN or Inf; the counts of
every histogram come back in a second transfer.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# On CPU, `torch.histc` is three times slower than the same bins computed with its own formula and
# `torch.bincount`; below this size one histc call costs less than the four ops of the formula.
BINCOUNT_MIN_NUMEL = 4096


@dataclass
class Histogram:
    """One tensor's histogram as TensorBoard stores it: ``bucket_limit`` are right edges, the
    first (empty) bucket's limit is the minimum."""

    tag: str
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limit: list[float]
    bucket: list[float]


@dataclass
class Job:
    """A tensor to bin: its tag, the copy to bin, its L2 norm (known from the scalars) and the
    divisor of its values (the AMP scale of still-scaled gradients, else 1). Under sharding
    ``tensor`` is this rank's shard and ``numel`` the whole tensor's number of values."""

    tag: str
    tensor: Tensor
    norm: float
    scale: float = 1.0
    numel: int | None = None  # None: the tensor's own

    def __post_init__(self) -> None:
        if self.numel is None:
            self.numel = self.tensor.numel()


def device_stats(tensors: list[Tensor]) -> list[Tensor]:
    """Per tensor, min, max and sum on its device (three 1-D parts for the transfer). NaN or Inf
    make them non-finite, and :func:`histograms` takes them again over the finite values."""
    if not tensors:
        return []
    mins, maxs, sums = [], [], []
    device = tensors[0].device
    for t in tensors:
        x = flat_float(t)
        lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
        mins.append(lo.to(device))
        maxs.append(hi.to(device))
        sums.append(x.sum().to(device))
    return [torch.stack(s).double() for s in (mins, maxs, sums)]


def histograms(jobs: list[Job], host: Iterator[list[float]], bins: int) -> list[Histogram]:
    """Every job's histogram: its min, max and sum from :func:`device_stats`'s parts (read from
    ``host``), its counts in one more transfer."""
    if not jobs:
        return []
    mins, maxs, sums = next(host), next(host), next(host)
    stats = []
    for job, lo, hi, total in zip(jobs, mins, maxs, sums, strict=True):
        if math.isfinite(job.norm):
            stats.append((lo, hi, float(job.tensor.numel()), total, job.norm * job.norm))
        else:  # a transfer more, on such steps only
            stats.append(tuple(finite_stats(job.tensor).tolist()))
    return binned(jobs, stats, bins)


def binned(
    jobs: list[Job],
    stats: list[tuple[float, float, float, float, float]],
    bins: int,
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> list[Histogram]:
    """Every job's histogram from its finite values' (min, max, count, sum, sum of squares):
    the counts binned on the device, then moved to the host in one transfer. Under sharding
    (``sum_over_ranks``) each rank bins its shard over the range the ranks share, and the
    counts are summed over the ranks before the transfer."""
    counts: list[Tensor] = []
    drawn = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    for job, (lo, hi, num, total, sumsq) in zip(jobs, stats, strict=True):
        if num == 0:
            continue  # every value non-finite: nothing to draw, counted in grad_nonfinite
        drawn.append((job, lo, hi, num, total, sumsq))
        if lo == hi and sum_over_ranks is None:
            counts.append(torch.full((1,), num, dtype=torch.float64, device=job.tensor.device))
            continue
        x = job.tensor
        if deterministic and x.device.type == "cuda":
            x = x.cpu()  # `torch.histc` has no deterministic CUDA kernel
        x = flat_float(x)
        if lo == hi:  # every finite value is lo: this shard's count of them, the one bin
            counts.append((x == lo).sum().reshape(1).double())
            continue
        counts.append(histc_(x, bins, lo, hi, finite=num == job.numel).double())
    if not counts:
        return []
    device = counts[0].device
    every_count = torch.cat([c.to(device) for c in counts])
    if sum_over_ranks is not None:
        every_count = sum_over_ranks(every_count)
    host_counts = every_count.tolist()  # the second transfer
    out, offset = [], 0
    for job, lo, hi, num, total, sumsq in drawn:
        n_bins = 1 if lo == hi else bins
        bucket = host_counts[offset : offset + n_bins]
        offset += n_bins
        div = job.scale
        out.append(
            Histogram(
                tag=job.tag,
                min=lo / div,
                max=hi / div,
                num=num,
                sum=total / div,
                sum_squares=sumsq / div**2,
                bucket_limit=[lo / div, *bucket_limits(lo / div, hi / div, n_bins)],
                bucket=[0.0, *bucket],
            )
        )
    return out


def bucket_limits(lo: float, hi: float, bins: int) -> list[float]:
    """Right edges of ``bins`` equal bins over [lo, hi], the last exactly ``hi``."""
    if bins == 1:
        return [hi]
    width = (hi - lo) / bins
    limits = [lo + width * (i + 1) for i in range(bins)]
    limits[-1] = hi
    return limits


def histc_(x: Tensor, bins: int, lo: float, hi: float, finite: bool) -> Tensor:
    """``torch.histc(x, bins, lo, hi)``, overwriting ``x`` (a copy the caller owns). On CPU, for
    large tensors of finite values, the same counts from histc's own formula (``(x - lo) / (hi -
    lo) * bins``, truncated, the maximum in the last bin) and ``torch.bincount``, in place so that
    no large temporary is allocated: a third of histc's time. (NaN has no bin: histc skips it.)"""
    if not finite or x.device.type != "cpu" or x.numel() < BINCOUNT_MIN_NUMEL:
        return torch.histc(x, bins=bins, min=lo, max=hi)
    index = x.sub_(lo).div_(hi - lo).mul_(bins).to(torch.int32).clamp_(max=bins - 1)
    return torch.bincount(index, minlength=bins)


def finite_stats(tensor: Tensor) -> Tensor:
    """Over the tensor's finite values: min, max, count, sum and sum of squares (float64)."""
    x = flat_float(tensor)
    finite = x.isfinite()
    zeroed = torch.where(finite, x, 0.0)
    if x.numel():
        lo = torch.where(finite, x, math.inf).amin()
        hi = torch.where(finite, x, -math.inf).amax()
    else:
        lo = hi = x.new_zeros(())
    row = [lo, hi, finite.sum().to(x.dtype), zeroed.sum(), zeroed.square().sum()]
    return torch.stack(row).double()


def flat_float(tensor: Tensor) -> Tensor:
    """The values as one flat float32 or float64 tensor (half precision counts and sums in fp32)."""
    x = tensor.detach().reshape(-1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
