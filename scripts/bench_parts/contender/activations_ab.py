"""The activation statistics' cost side by side inside one run: the GradientMonitor stays in every
block, and only its activation statistics (`log_activations`) go in and out by `Interleaver`'s
turns, so the difference between paired blocks is what the statistics alone cost (the probe's
attach and detach, the pre-hooks, their share of the logging step's one host transfer, the
rules that read them and their scalars). The time inside the probe's own methods is clocked too.
"""

import statistics
import time
from typing import Any

from bench_parts.contender.clocks import Interleaver

# The steps at a block's end whose time the window estimate compares: the logging step (the
# block's last) and the one before it, since the probe attaches in the logging step's
# `on_train_batch_start`, which Lightning calls for callbacks before the module's own hook that
# clocks the step.
WINDOW = 2


class ActivationInterleaver(Interleaver):
    """`Interleaver`'s blocks and pairs, with `log_activations` switched instead of the monitor.
    The switch happens at a block's first step, before the block's one logging step (its last),
    whose `on_train_batch_start` decides whether to attach the probe.

    Two estimates, each on the wall and the process's CPU clock (on a machine shared with other
    work, time spent waiting for a core is in the first only):

    - whole blocks: `Interleaver.overhead_pct`, the median over pairs of the block with the
      statistics minus the block without, over the median block without;
    - windows: the statistics do all their work in a block's logging step, so the pairs' last
      `WINDOW` steps are compared instead of all 50, which leaves the other steps' noise out of
      the difference. The mean over pairs, not the median: most logging steps measure nothing
      (see gradwatch.monitor.activations), so the median pair is one that did not.

    Left out besides `Interleaver`'s: the first pair, whose logging step is the monitor's first
    (its one-off warm-up is in the block without the statistics: a mean would count it), and
    pairs where either block holds one of the monitor's histogram steps (the monitor is in both
    blocks, so a histogram falls on either side)."""

    def __init__(self, block: int, hist_every: int, epoch_steps: int = 0) -> None:
        super().__init__(block, hist_every, epoch_steps=epoch_steps)
        self.probe_seconds = 0.0
        self.cpu_starts: list[float] = []
        # Block index -> (wall, CPU) time at the start of its window.
        self.window_starts: dict[int, tuple[float, float]] = {}
        self._clock_probe()

    def step_start(self, trainer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % self.block == self.block - WINDOW:
            self.window_starts[step // self.block] = (time.perf_counter(), time.process_time())
        if step % self.block:
            return
        if self.monitor is None:
            from gradwatch.monitor import GradientMonitor

            self.monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        on = self.monitor_in(step // self.block)
        self.monitor.log_activations = on
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())
        self.on.append(on)

    def pairs(self) -> list[tuple[int, int, bool]]:
        def has_hist(index: int) -> bool:
            return bool(self.hist_every) and ((index + 1) * self.block) % self.hist_every == 0

        return [
            (with_, without, False)
            for with_, without, _ in super().pairs()
            if min(with_, without) > 0 and not has_hist(with_) and not has_hist(without)
        ]

    def estimates(self, end: float, cpu_end: float) -> dict[str, float]:
        """Whole blocks and windows, on the wall and the CPU clock, in % of the loop."""
        out = {"blocks_wall_pct": self.overhead_pct(end)}
        wall, self.starts = self.starts, self.cpu_starts
        try:
            out["blocks_cpu_pct"] = self.overhead_pct(cpu_end)
        finally:
            self.starts = wall
        for clock, name, starts, last in (
            (0, "wall", wall, end),
            (1, "cpu", self.cpu_starts, cpu_end),
        ):
            stops = [*starts[1:], last]
            diffs, without = [], []
            for with_, without_, _ in self.pairs():
                if with_ in self.window_starts and without_ in self.window_starts:
                    on = stops[with_] - self.window_starts[with_][clock]
                    off = stops[without_] - self.window_starts[without_][clock]
                    diffs.append(on - off)
                    without.append(stops[without_] - starts[without_])
            out[f"windows_{name}_pct"] = 100 * statistics.fmean(diffs) / statistics.median(without)
        return out

    def probe_pct(self, end: float) -> float:
        """The time inside the probe's methods and pre-hooks as a share of the blocks with
        the statistics on: their own cost, free of the machine's drift between blocks."""
        times = [b - a for a, b in zip(self.starts, [*self.starts[1:], end], strict=True)]
        on_time = sum(t for t, on in zip(times, self.on, strict=True) if on)
        return 100 * self.probe_seconds / on_time if on_time else float("nan")

    def _clock_probe(self) -> None:
        """Wraps ActivationProbe's attach, detach and every pre-hook it makes in a clock."""
        from gradwatch.monitor.activations import ActivationProbe

        def timed(fn: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.probe_seconds += time.perf_counter() - start

            return run

        make_hook = ActivationProbe._hook
        ActivationProbe.attach = timed(ActivationProbe.attach)
        ActivationProbe.detach = timed(ActivationProbe.detach)
        ActivationProbe._hook = lambda probe, *args: timed(make_hook(probe, *args))


def interleaver(spec: dict[str, Any]) -> Interleaver:
    """The in-run A/B a contender's `interleave` spec asks for: the monitor in and out (the
    default) or, with `"switch": "activations"`, its activation statistics."""
    spec = dict(spec)
    if spec.pop("switch", "monitor") == "activations":
        return ActivationInterleaver(**spec)
    return Interleaver(**spec)
