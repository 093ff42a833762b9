"""A logging step's scalars: per parameter, per layer and total, under their tags.

Layer norms and totals are combined on the host from the parameters' norms (for L2, the norm of
norms). Where several optimizers step on different steps, a total never mixes them: each
optimizer that stepped gets its own (``grad_norm/total_optimizer1``), and ``grad_norm/total`` is
written on the steps where every optimizer stepped.
"""

import math
from dataclasses import dataclass, field

from gradwatch.monitor.names import TOTAL, TOTAL_CLIPPED, Tags, optimizer_total
from gradwatch.monitor.stats import HostValues, combine


@dataclass
class StepScalars:
    """What the loggers get (``metrics``, tag -> value) and what the health rules read."""

    metrics: dict[str, float] = field(default_factory=dict)
    # By layer tag (a layer's name unless it would collide: a module named `total`), so that the
    # history, the summary and the alerts name each layer as TensorBoard does.
    layer_norms: dict[str, float] = field(default_factory=dict)  # L2
    totals: dict[str, float] = field(default_factory=dict)  # L2, "total" or per optimizer
    nonfinite: dict[str, float] = field(default_factory=dict)
    update_ratios: dict[str, float] = field(default_factory=dict)
    weight_norms: dict[str, float] = field(default_factory=dict)  # L2, per layer
    # 16-bit layers: the share of the values the gradient asked to move that stayed put.
    rounded_away: dict[str, float] = field(default_factory=dict)


def family(ord_: float) -> str:
    """The tag family of a norm type: ``grad_norm`` for L2, ``grad_norm_inf``, ``grad_norm_1``."""
    if ord_ == 2.0:
        return "grad_norm"
    return "grad_norm_" + ("inf" if math.isinf(ord_) else f"{ord_:g}")


def step_scalars(
    measured: list[tuple[int, HostValues]],
    tags: Tags,
    norm_types: list[float],
    every_optimizer_stepped: bool,
    clipped_total: float | None = None,
    weight_norms: bool = True,
    update_ratios: bool = True,
) -> StepScalars:
    """The scalars of one logging step from the host values of each optimizer that stepped in
    it (``(optimizer index, values)``)."""
    out = StepScalars()
    metrics = out.metrics
    for ord_ in norm_types:
        fam = family(ord_)
        per_layer: dict[str, list[float]] = {}
        totals: dict[str, float] = {}
        for index, values in measured:
            norms = values.grad_norms[ord_]
            for name, v in norms.items():
                metrics[f"{fam}/{tags.param(name)}"] = v
                per_layer.setdefault(tags.layer_of_param(name), []).append(v)
            if not every_optimizer_stepped and norms:
                totals[optimizer_total(index)] = combine(list(norms.values()), ord_)
        layer_norms = {lay: combine(vs, ord_) for lay, vs in per_layer.items()}
        for tag, v in layer_norms.items():
            metrics[f"{fam}/{tag}"] = v
        if every_optimizer_stepped:
            totals[TOTAL] = combine(list(layer_norms.values()), ord_)
        for key, v in totals.items():
            metrics[f"{fam}/{key}"] = v
        if ord_ == 2.0:
            out.layer_norms, out.totals = layer_norms, totals
    if clipped_total is not None:
        metrics[f"grad_norm/{TOTAL_CLIPPED}"] = clipped_total

    nonfinite: dict[str, float] = {}
    for _, values in measured:
        for name, count in values.nonfinite.items():
            tag = tags.layer_of_param(name)
            nonfinite[tag] = nonfinite.get(tag, 0.0) + count
    # Written only where a count is non-zero: in a healthy run these tags would be a card of zeros
    # per layer. The health rules still get every count (``out.nonfinite``).
    for tag, count in nonfinite.items():
        if count > 0:
            metrics[f"grad_nonfinite/{tag}"] = count
    if any(count > 0 for count in nonfinite.values()):
        metrics[f"grad_nonfinite/{TOTAL}"] = sum(nonfinite.values())
    out.nonfinite = nonfinite

    weights = {n: v for _, values in measured for n, v in values.weight_norms.items()}
    per_layer_weights: dict[str, list[float]] = {}
    for name, v in weights.items():
        per_layer_weights.setdefault(tags.layer_of_param(name), []).append(v)
    out.weight_norms = {lay: combine(vs, 2.0) for lay, vs in per_layer_weights.items()}
    if weight_norms:
        for name, v in weights.items():
            metrics[f"weight_norm/{tags.param(name)}"] = v
    if update_ratios:
        out.update_ratios = _update_ratios(measured, weights, tags)
        for tag, ratio in out.update_ratios.items():
            metrics[f"update_ratio/{tag}"] = ratio
        out.rounded_away = _rounded_away(measured, tags)
        for tag, share in out.rounded_away.items():
            metrics[f"update_rounded_away/{tag}"] = share
    return out


def _rounded_away(measured: list[tuple[int, HostValues]], tags: Tags) -> dict[str, float]:
    """Per layer tag with 16-bit weights: the share of the values its gradient asked to move
    that the step left as they were (their update rounded away)."""
    counts: dict[str, list[float]] = {}
    for _, values in measured:
        for name, (lost, asked) in values.rounded_away.items():
            kept = counts.setdefault(tags.layer_of_param(name), [0.0, 0.0])
            kept[0] += lost
            kept[1] += asked
    return {lay: lost / asked for lay, (lost, asked) in counts.items() if asked > 0}


def _update_ratios(
    measured: list[tuple[int, HostValues]], weights: dict[str, float], tags: Tags
) -> dict[str, float]:
    """Per layer tag: the norm of the step's change of the layer's parameters over their norm
    before it."""
    updates = {n: v for _, values in measured for n, v in values.update_norms.items()}
    members: dict[str, list[str]] = {}
    for name in weights:
        members.setdefault(tags.layer_of_param(name), []).append(name)
    ratios = {}
    for lay, names in members.items():
        if not all(n in updates for n in names):
            continue
        delta = math.sqrt(sum(updates[n] ** 2 for n in names))
        weight = math.sqrt(sum(weights[n] ** 2 for n in names))
        if weight > 0:
            ratios[lay] = delta / weight
    return ratios
