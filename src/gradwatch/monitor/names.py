"""Which parameters the monitor measures, under which names, and the tags they are written under.

A parameter's name is its path in the LightningModule without the leading module path that every
parameter shares (``net.fc1.weight`` and torch.compile's ``net._orig_mod.fc1.weight`` become
``fc1.weight``); its layer is the module that holds it (``fc1``). Tags are made once per run, and
no two quantities ever share one: see :class:`Tags`.
"""

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gradwatch.layers import layer_of
from gradwatch.monitor import sharded

# The whole model's gradient norm, and the same after clipping: no layer or parameter may take
# these tags.
TOTAL = "total"
TOTAL_CLIPPED = "total_clipped"


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its name, without the leading module path that every parameter shares,
    as long as every name keeps a ``layer.param`` form. A tensor registered twice (tied weights) is
    one parameter, under the name it is first registered by, as ``named_parameters`` gives it."""
    named = list(module.named_parameters())
    parts = [n.split(".") for n, _ in named]
    strip = 0
    while parts and all(len(p) - strip > 2 for p in parts):
        if len({p[strip] for p in parts}) != 1:
            break
        strip += 1
    return {id(p): ".".join(s[strip:]) for (_, p), s in zip(named, parts, strict=True)}


def optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    """The optimizer's trainable parameters, each once, in its own order."""
    seen: set[int] = set()
    params = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                params.append(p)
    return params


def optimizer_total(index: int) -> str:
    """The total of one optimizer's gradients, where several optimizers step on different steps."""
    return f"{TOTAL}_optimizer{index}"


class Tags:
    """The tag of every parameter, layer and total, distinct from each other.

    A layer's tag is its name and a parameter's its name, unless that would collide: with a total
    (a module named ``total``), or with another quantity. A colliding layer becomes
    ``<name>-layer`` and a colliding parameter ``<name>-param``. A parameter of the top-level
    module (``scale``) is alone in its layer: one quantity under one tag.

    Args:
        names: every parameter name of the module (:func:`parameter_names`), claimed in order.
        num_optimizers: the Trainer's optimizers; with several, their totals are reserved too.
    """

    def __init__(self, names: list[str], num_optimizers: int = 1) -> None:
        self._used = {TOTAL, TOTAL_CLIPPED}
        if num_optimizers > 1:
            self._used.update(optimizer_total(i) for i in range(num_optimizers))
        self._param: dict[str, str] = {}
        self._layer: dict[str, str] = {}
        self._layer_of_param: dict[str, str] = {}
        for name in names:
            self.param(name)
        for name in names:
            self.layer(layer_of(name))

    def param(self, name: str) -> str:
        if name not in self._param:
            self._param[name] = _claim(name, "param", self._used)
        return self._param[name]

    def layer_of_param(self, name: str) -> str:
        """The tag of a parameter's layer (asked for every parameter at every step written)."""
        tag = self._layer_of_param.get(name)
        if tag is None:
            tag = self._layer_of_param[name] = self.layer(layer_of(name))
        return tag

    def layer(self, layer: str) -> str:
        if layer not in self._layer:
            top_level = layer in self._param  # a parameter of the top-level module
            self._layer[layer] = (
                self._param[layer] if top_level else _claim(layer, "layer", self._used)
            )
        return self._layer[layer]


def _claim(name: str, kind: str, used: set[str]) -> str:
    tag = name
    if tag in used:
        tag = f"{name}-{kind}"
    n = 2
    while tag in used:
        tag = f"{name}-{kind}{n}"
        n += 1
    used.add(tag)
    return tag


def stored_values(tensor: Tensor) -> Tensor:
    """The values this process stores: a dense tensor itself; of a sparse one, its stored values
    once duplicates are summed (their norm is the dense tensor's norm); of a sharded one (FSDP2's
    DTensor), this rank's shard (:mod:`gradwatch.monitor.sharded` combines the ranks')."""
    tensor = sharded.local(tensor)
    if tensor.layout == torch.strided:
        return tensor
    return tensor.coalesce().values()
