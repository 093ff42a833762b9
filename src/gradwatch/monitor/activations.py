"""Activation statistics on logging steps only: forward pre-hooks attached before such a step's
forward and removed after it, so every other step runs without a hook.

Each module that holds parameters of its own (``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``...)
gets a pre-hook that looks at its input. An input that requires grad was produced by the network
(data does not): it is the previous such module's output after its activation, whatever form the
activation takes (a module or ``torch.relu`` in ``forward``), and its statistics are named after
that previous module, in the order the forward calls them (``fc1`` for what ``fc2`` receives).
The units are the input's channels (dimension 1 of a convolution's input) or its last dimension
(everything else); every other dimension is samples. Per layer, on the device, no host sync:

- ``dead``: the share of units exactly 0 for every sample (ReLU units that never fire);
- ``saturated``: where every value lies in [0, 1] or [-1, 1] and none is exactly 0 (a sigmoid's or
  tanh's outputs, not a ReLU's), the share of units within ``eps`` of a bound for at least 95% of
  the samples;
- ``alike``: the share of units that vary over the samples and are a copy of another unit on every
  sample (units that started with the same weights stay the same).

The hooks keep what they receive; the statistics are taken when the probe is detached, after
the forward, layers of one shape stacked into one computation: these small tensor operations cost
their dispatch more than their arithmetic, so a deep network of equal widths costs about what one
of its layers does.

Not every logging step is measured: the hooks and the statistics cost about a training step of a
small network, and the problems they look for last. The first logging step is measured, then
every ``measure_every``-th; once a layer's dead, saturated or alike share reaches ``watch``, every
one, until it falls back, so that the rules' patience (which counts the logs that measured) runs
at every log where it matters. Deciding that reads the last measured shares as the logging
step's one transfer brought them to the host (the monitor hands them over: no wait for a device).
Under several processes (each would decide from its own batch) and with ``keep_values``
(activation histograms) every logging step is measured.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch.layers import layer_of

STATS = ("units", "dead", "saturated", "alike")
# Samples and units looked at per layer: enough to tell a dead or copied unit, and a bound on the
# cost (samples x units per layer).
MAX_SAMPLES = 512
MAX_UNITS = 512
# Layers of one shape are measured together in stacks of at most this many values (their
# working copies, twice that, stay a few MB on a GPU: eight layers of 512 x 512).
STACKED_VALUES = 2**21
# A unit saturated on this share of the samples is saturated.
SATURATED_SAMPLES = 0.95
# Logging steps measured while every layer looks healthy: one in this many. A share at or over
# WATCH (half the smallest of the rules' default fractions) has every logging step measured.
MEASURE_EVERY = 4
WATCH = 0.25
CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


@dataclass
class ActivationProbe:
    """Hooks for one logging step and what they measured, on the device.

    Args:
        eps: how close to a bound a saturated output is.
        keep_values: keep each layer's (sampled) outputs for histograms.
        measure_every: while no share reaches ``watch``, measure one logging step in this many.
        watch: a dead, saturated or alike share from which every logging step is measured.
    """

    eps: float = 1e-3
    keep_values: bool = False
    measure_every: int = MEASURE_EVERY
    watch: float = WATCH
    stats: dict[str, Tensor] = field(default_factory=dict)  # layer -> STATS, one tensor each
    values: dict[str, Tensor] = field(default_factory=dict)
    # The largest dead, saturated or alike share of the last measured step, on the host.
    largest_share: float = 0.0
    _handles: list[RemovableHandle] = field(default_factory=list)
    # What the hooks received since attach (layer -> samples x units), measured by detach.
    _received: dict[str, Tensor] = field(default_factory=dict)
    _last: str | None = None
    _logs: int = 0  # attach calls: logging steps
    # The modules to hook and their layers, worked out once per module and set of names.
    _targets: tuple[int, int, list[tuple[str, nn.Module]]] | None = None

    def attach(self, module: nn.Module, names: dict[int, str]) -> None:
        """Hooks every module of ``module`` that holds parameters itself, if this logging step
        is one to measure; ``names`` maps ``id(parameter)`` to the monitor's parameter names,
        whose layer names the module."""
        self.stats, self.values, self._last = {}, {}, None
        self._received = {}
        due = self._logs % self.measure_every == 0
        self._logs += 1
        if not (due or self.keep_values or self._watching()):
            return
        for layer, sub in self._modules_to_hook(module, names):
            self._handles.append(sub.register_forward_pre_hook(self._hook(layer, sub)))

    def _modules_to_hook(
        self, module: nn.Module, names: dict[int, str]
    ) -> list[tuple[str, nn.Module]]:
        if self._targets is None or self._targets[:2] != (id(module), id(names)):
            targets = []
            for sub in module.modules():
                own = list(sub.parameters(recurse=False))
                if own and id(own[0]) in names:
                    targets.append((layer_of(names[id(own[0])]), sub))
            self._targets = (id(module), id(names), targets)
        return self._targets[2]

    def detach(self) -> None:
        """Removes the hooks (the forward is over) and works out the statistics of what they
        received: layers of one shape in one computation, whose cost is then that of one layer
        (these small tensor operations cost their dispatch, not their arithmetic)."""
        if not self._handles:  # every step's end: most steps had none
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        by_shape: dict[tuple, list[str]] = {}
        for layer, units in self._received.items():
            by_shape.setdefault((units.shape, units.device), []).append(layer)
        measured = {}
        for (shape, _), layers in by_shape.items():
            # In stacks of at most STACKED_VALUES values: their working copies stay a few MB.
            size = max(1, STACKED_VALUES // shape.numel())
            for start in range(0, len(layers), size):
                chunk = layers[start : start + size]
                stacked = torch.stack([self._received[layer] for layer in chunk])
                measured.update(zip(chunk, unit_stats(stacked, self.eps), strict=True))
        # In the forward's order, as the logs and alerts name the layers.
        self.stats = {layer: measured[layer] for layer in self._received}
        self._received = {}

    def _watching(self) -> bool:
        """Whether the last measured step had a share at or over ``watch``; or could have:
        under several processes each would read its own batch's shares and could decide
        otherwise than the others, while their statistics join one collective (FSDP2): there
        every logging step is measured."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return True
        return self.largest_share >= self.watch

    def _hook(self, layer: str, module: nn.Module) -> Callable:
        unit_dim = 1 if isinstance(module, CHANNEL_FIRST) else -1

        def pre_hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            producer, self._last = self._last, layer
            if producer is None or not isinstance(x, Tensor) or not x.requires_grad:
                return
            if not x.is_floating_point() or x.dim() < 2:
                return
            units = x.detach().movedim(unit_dim, -1).reshape(-1, x.shape[unit_dim])
            units = units[:MAX_SAMPLES, :MAX_UNITS].float()
            # Kept (a view: autograd keeps the input for the backward anyway) until detach
            # measures every layer at once; a layer called twice keeps its last input.
            self._received[producer] = units
            if self.keep_values:
                self.values[producer] = units.clone()

        return pre_hook


_PROJECTIONS: dict[tuple, Tensor] = {}


def _projections(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Two fixed random weightings of ``n`` samples, made once per size and device: the
    statistics neither depend on nor disturb the global random state."""
    key = (n, dtype, device)
    if key not in _PROJECTIONS:
        gen = torch.Generator().manual_seed(0)
        _PROJECTIONS[key] = torch.randn(2, n, 1, generator=gen, dtype=dtype).to(device)
    return _PROJECTIONS[key]


def unit_stats(x: Tensor, eps: float) -> Tensor:
    """``STATS`` of a samples x units matrix, or of a stack of them (layers x samples x units:
    one row of ``STATS`` per layer), as one tensor on its device (no host sync).

    Each full-size pass costs little next to each operation's own overhead at these sizes, so
    the units' minima and maxima are taken once and serve dead, varying and the layer's range."""
    if x.dim() == 2:
        return unit_stats(x.unsqueeze(0), eps)[0]
    n_layers, n, n_units = x.shape
    lo_u, hi_u = x.amin(1), x.amax(1)  # layers x units
    lo, hi = lo_u.amin(1, keepdim=True), hi_u.amax(1, keepdim=True)  # layers x 1
    dead = (lo_u == 0) & (hi_u == 0)
    # Saturation as the distance from the range's centre: sigmoid-like outputs (none negative)
    # lie in [0, 1] around 0.5, tanh-like ones in [-1, 1] around 0; near a bound is within eps.
    centre = ((lo >= 0) * 0.5).unsqueeze(1)  # layers x 1 x 1
    off_centre = (x - centre).abs_()
    near = (off_centre > (1 - eps) - centre).sum(1)
    # No output exactly 0 (a ReLU's zeros are not a sigmoid's): with none negative the minimum
    # is above 0; otherwise the smallest distance from the centre 0 is.
    no_zero = torch.where(lo >= 0, lo, off_centre.amin((1, 2)).unsqueeze(1)) > 0
    bounded = (torch.maximum(-lo, hi) <= 1) & no_zero
    saturated = (near >= SATURATED_SAMPLES * n) & bounded
    # Copies: units equal on every sample (up to float rounding). Two projections of each unit's
    # column onto fixed random sample weights are equal for copies and, for units that differ,
    # equal by chance only: sorted, a copy sits next to its twin. N x U work, not N x U x U.
    # Elementwise, not a matmul: BLAS takes milliseconds for this skinny product on a busy CPU.
    proj = (_projections(n, x.dtype, x.device) * x.unsqueeze(1)).sum(2)  # layers x 2 x units
    order = proj[:, 0].argsort(1)
    p = proj.gather(2, order.unsqueeze(1).expand(-1, 2, -1))
    tol = 1e-5 * (proj.abs().amax(2, keepdim=True) + 1e-30)
    close = ((p[:, :, 1:] - p[:, :, :-1]).abs() <= tol).all(1)  # unit k and k+1, sorted
    twin = torch.zeros(n_layers, n_units, dtype=torch.bool, device=x.device)
    twin[:, 1:] |= close
    twin[:, :-1] |= close
    same = torch.empty_like(twin).scatter_(1, order, twin)
    # Units that do not vary (dead, or saturated on every sample) are alike for another reason.
    alike = same & (hi_u > lo_u) & ~saturated
    share = torch.stack([dead, saturated, alike], 2).float().mean(1)
    return torch.cat([share.new_full((n_layers, 1), float(n_units)), share], 1)
