"""The clocks inside a contender process: the training steps' own clock (`CLOCK`), the time
inside the GradientMonitor's hooks (`MonitorHookTimer`), and the monitor's overhead side by side
inside one run (`Interleaver`)."""

import statistics
import time
from typing import Any


class LoopClock:
    """Times the training steps alone (first step start to last step end) from the module's own
    `on_train_batch_start`/`on_train_batch_end`: Lightning calls those hooks whether or not they
    are overridden, so unlike an extra callback (about 12 us per epoch of dispatch) it adds
    nothing to what is measured."""

    def __init__(self) -> None:
        self.start = self.end = self.cpu_start = self.cpu_end = None

    def batch_start(self) -> None:
        if self.start is None:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def batch_end(self) -> None:
        self.end, self.cpu_end = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return (self.end or 0.0) - (self.start or 0.0)

    @property
    def cpu_seconds(self) -> float:
        # CPU time of the process (all its threads); wall time is the measure, this a cross-check.
        return (self.cpu_end or 0.0) - (self.cpu_start or 0.0)


CLOCK = LoopClock()


class MonitorHookTimer:
    """Wall time inside the GradientMonitor's per-step hooks, in this process: the monitor's own
    share of the very run that is timed. Lightning's dispatch of the hooks (a few us a step, paid
    by any callback) and the TensorBoard writer thread's work are outside it; the side-by-side
    ratios include them."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        from gradwatch.monitor import GradientMonitor

        for name in ("on_before_optimizer_step", "on_train_batch_end"):
            hook = getattr(GradientMonitor, name)

            def timed(self: Any, *args: Any, _hook: Any = hook) -> None:
                start = time.perf_counter()
                try:
                    _hook(self, *args)
                finally:
                    cls.seconds += time.perf_counter() - start

            setattr(GradientMonitor, name, timed)


class Interleaver:
    """The monitor's overhead side by side inside one run: steps go in blocks of the monitor's
    scalar cadence (each block ends with one logging step), blocks in pairs, and the monitor is in
    `trainer.callbacks` for one block of each pair and out of it for the other (the second block
    of even pairs, the first of odd ones: see `monitor_in`). Adjacent blocks are tens of
    milliseconds apart, so the machine's drift, which moves whole runs by 10 to 30% here, divides
    out. Lightning's dispatch of the monitor's hooks is inside the difference, as in a run with
    and without it.

    The estimate: the median over pairs of (block with - block without), the pairs whose block
    with the monitor holds a histogram step apart, weighted by how many there are, over the median
    block without. One-off costs (the first logging step's warm-up) are left out: per-step cost.
    So are pairs where the run does work of its own on one side only: an epoch's start, when
    epochs are longer than a block, and a checkpoint save (`checkpoint_every`)."""

    def __init__(
        self,
        block: int,
        hist_every: int,
        noop: bool = False,
        norms_only: bool = False,
        epoch_steps: int = 0,
        checkpoint_every: int = 0,
    ) -> None:
        self.block, self.hist_every = block, hist_every
        # Epochs longer than a block start inside one (the mid block's shuffle of 60,000 rows
        # takes 140 ms): pairs holding an epoch's first step are left out.
        self.epoch_steps = epoch_steps if epoch_steps > block else 0
        # A save of last.ckpt takes ~3 ms, a tenth of a tutorial block: counted, it would be the
        # monitor's cost whenever it fell on the monitor's side (+1% for a monitor that does
        # nothing, measured in the tutorial run).
        self.checkpoint_every = checkpoint_every
        # noop: a Callback that does nothing takes the monitor's place, in and out by the same
        # turns: what Lightning's dispatch of any callback's hooks costs.
        # norms_only: a Callback that takes every step's gradient norms as every_step does (one
        # foreach kernel, stacked on the device) and nothing else: every_step's floor.
        self.monitor: Any = None
        if noop:
            from lightning.pytorch import Callback

            self.monitor = Callback()
        elif norms_only:
            self.monitor = _norms_only()
        self.starts: list[float] = []
        self.on: list[bool] = []

    def step_start(self, trainer: Any) -> None:
        """Called from the module's own on_train_batch_start, at every step."""
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % self.block:
            return
        if self.monitor is None:
            from gradwatch.monitor import GradientMonitor

            self.monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        on = self.monitor_in(step // self.block)
        # Between callback hooks (this runs in the module's own hook): no list is being walked.
        callbacks = trainer.callbacks
        if on and self.monitor not in callbacks:
            callbacks.append(self.monitor)
        elif not on and self.monitor in callbacks:
            callbacks.remove(self.monitor)
        self.starts.append(time.perf_counter())
        self.on.append(on)

    @staticmethod
    def monitor_in(index: int) -> bool:
        """Whether block ``index`` runs with the monitor: 1, 2, 5, 6, 9, 10, ... With the
        defaults' cadences (blocks of 50 steps, histograms every 500, a checkpoint every 1000)
        the histogram steps 499, 1499, ... fall in blocks with the monitor (9, 29, ...), and
        999, 1999, ... in blocks without it, in pairs left out for their checkpoint save."""
        return (index % 2 == 1) == ((index // 2) % 2 == 0)

    def pairs(self) -> list[tuple[int, int, bool]]:
        """The pairs of blocks the estimate uses: (block with, block without, has a histogram
        step), for every pair of the run but those left out."""
        out = []
        for pair in range(len(self.on) // 2):
            a, b = 2 * pair, 2 * pair + 1
            first, last = a * self.block, (b + 1) * self.block  # the pair's steps
            # An epoch starting at step s runs its set-up (the shuffle) before s, and a checkpoint
            # is saved after step s - 1 when s is a multiple of its cadence: both in s - 1's block.
            cadences = (self.epoch_steps, self.checkpoint_every)
            if any(every and first // every != last // every for every in cadences):
                continue
            with_, without = (a, b) if self.on[a] else (b, a)
            # The block's last step writes histograms when (step + 1) is a multiple of the cadence.
            has_hist = bool(self.hist_every) and ((with_ + 1) * self.block) % self.hist_every == 0
            out.append((with_, without, has_hist))
        return out

    def overhead_pct(self, end: float) -> float:
        times = [b - a for a, b in zip(self.starts, [*self.starts[1:], end], strict=True)]
        normal, hist, without = [], [], []
        for with_, without_, has_hist in self.pairs():
            (hist if has_hist else normal).append(times[with_] - times[without_])
            without.append(times[without_])
        extra = sum(statistics.median(group) * len(group) for group in (normal, hist) if group)
        return 100 * extra / (len(normal) + len(hist)) / statistics.median(without)


def _norms_only() -> Any:
    import torch
    from lightning.pytorch import Callback

    class NormsOnly(Callback):
        def __init__(self) -> None:
            self.kept: list[Any] = []

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            self.kept.append(torch.stack(torch._foreach_norm(grads, 2)))
            if len(self.kept) == 50:  # what every_step keeps until a logging step
                self.kept = []

    return NormsOnly()
