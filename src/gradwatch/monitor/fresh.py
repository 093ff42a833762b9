"""The gradient a logging step's backward produced, to tell it from what ``.grad`` holds.

Tensor hooks on the parameters, registered only for a logging step (and removed after it), add
up each backward's gradient of every parameter before autograd accumulates it into ``.grad``.
When the optimizer steps, ``.grad`` should hold just that sum; what it holds beyond it was carried
over from earlier steps: a ``zero_grad`` that never runs. Single process, without a GradScaler
only: under DDP ``.grad`` is the mean over the processes, under AMP it is unscaled after the
backward, and either differs from the backward's own gradient for reasons of their own.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


@dataclass
class FreshGradients:
    """The backward's gradients of one logging step, on their device."""

    sums: dict[int, Tensor] = field(default_factory=dict)  # id(parameter) -> summed gradient
    _handles: list[RemovableHandle] = field(default_factory=list)

    def attach(self, params: list[Tensor]) -> None:
        self.detach()
        for p in params:
            if p.requires_grad:
                self._handles.append(p.register_hook(self._adder(id(p))))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.detach()
        self.sums = {}

    def _adder(self, key: int):
        def add(grad: Tensor) -> None:
            if grad.layout != torch.strided:
                return  # sparse: not compared
            kept = self.sums.get(key)
            self.sums[key] = grad.detach().clone() if kept is None else kept + grad.detach()

        return add

    def carried_and_fresh(self, params: list[Tensor]) -> Tensor | None:
        """The norms of what ``.grad`` holds beyond this step's backward, and of the backward's
        own gradient, over every parameter that has both (a 2-element tensor, no host sync)."""
        pairs = [
            (p.grad, self.sums[id(p)]) for p in params if p.grad is not None and id(p) in self.sums
        ]
        pairs = [(g, s) for g, s in pairs if g.layout == torch.strided and g.shape == s.shape]
        if not pairs:
            return None
        # One parameter at a time: a difference of every gradient at once would be one more copy
        # of all of them in memory.
        carried = torch.stack([torch.linalg.vector_norm(g - s.to(g.dtype)) for g, s in pairs])
        fresh = torch.stack(torch._foreach_norm([s for _, s in pairs]))
        carried, fresh = carried.norm(), fresh.norm()
        return torch.stack([carried.float(), fresh.float()])
