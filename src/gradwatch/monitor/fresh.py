"""The gradient a logging step's backward produced, to tell it from what ``.grad`` holds.

Tensor hooks on the parameters, registered only for a logging step (and removed after it), add
up each backward's gradient of every parameter before autograd accumulates it into ``.grad``.
When the optimizer steps, ``.grad`` should hold just that sum; what it holds beyond it was carried
over from earlier steps: a ``zero_grad`` that never runs. A parameter whose ``.grad`` is None when
the step's first backward begins (``zero_grad``'s default) carries nothing: it gets no hook and no
copy. Single process, without a GradScaler only: under DDP ``.grad`` is the mean over the
processes, under AMP it is unscaled after the backward, and either differs from the backward's
own gradient for reasons of their own.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


@dataclass
class FreshGradients:
    """The backward's gradients of one logging step, on their device."""

    sums: dict[int, Tensor] = field(default_factory=dict)  # id(parameter) -> summed gradient
    # Parameters whose ``.grad`` was None when the step began (``zero_grad(set_to_none=True)``,
    # torch's default): nothing can be carried, ``.grad`` will be the step's own gradient. They
    # need no hook and no copy.
    clean: set[int] = field(default_factory=set)
    _handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def attached(self) -> bool:
        """Whether this step is being followed: a hook is on, or a parameter started clean."""
        return bool(self.sums or self.clean)

    def attach(self, params: list[Tensor]) -> None:
        """Before each backward of the logging step (every micro-batch of an accumulated one),
        after ``zero_grad``."""
        first = not self.attached
        self.detach()
        for p in params:
            if not p.requires_grad or id(p) in self.clean:
                continue
            if first and p.grad is None:
                self.clean.add(id(p))
                continue
            self._handles.append(p.register_hook(self._adder(id(p))))

    def detach(self) -> None:
        if not self._handles:  # every step's end: most steps had none
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.detach()
        self.sums = {}
        self.clean = set()

    def _adder(self, key: int):
        def add(grad: Tensor) -> None:
            if grad.layout != torch.strided:
                return  # sparse: not compared
            kept = self.sums.get(key)
            self.sums[key] = grad.detach().clone() if kept is None else kept + grad.detach()

        return add

    def carried_and_fresh(self, params: list[Tensor]) -> Tensor | None:
        """The norms of what ``.grad`` holds beyond this step's backward, and of the backward's
        own gradient, over every parameter that has both (a 2-element tensor, no host sync).
        None when no hook summed anything: every parameter began the step clean (or none has a
        gradient to compare), and nothing was carried."""
        with_grad = [p for p in params if p.grad is not None and p.grad.layout == torch.strided]
        pairs = [(p.grad, self.sums[id(p)]) for p in with_grad if id(p) in self.sums]
        pairs = [(g, s) for g, s in pairs if g.shape == s.shape]
        if not pairs:
            return None
        clean = [p.grad for p in with_grad if id(p) in self.clean]  # its own gradient is .grad
        fresh = torch.stack(torch._foreach_norm([s for _, s in pairs] + clean)).norm()
        # One parameter at a time: a difference of every gradient at once would be one more
        # copy of all of them in memory.
        diffs = [torch.linalg.vector_norm(g - s.to(g.dtype)) for g, s in pairs]
        carried = torch.stack(diffs).norm()
        return torch.stack([carried.float(), fresh.float()])
