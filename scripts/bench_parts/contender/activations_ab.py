"""The activation statistics' cost side by side inside one run: the GradientMonitor stays in every
block, and only its activation statistics (`log_activations`) go in and out by `Interleaver`'s
turns, so the difference between paired blocks is what the statistics alone cost (the hooks'
attach and detach, the pre-hooks, their share of the logging step's one host transfer and the
rules that read them). The time inside the probe's own methods is clocked too."""

import time
from typing import Any

from bench_parts.contender.clocks import Interleaver


class ActivationInterleaver(Interleaver):
    """`Interleaver`'s blocks and estimate, with `log_activations` switched instead of the
    monitor. The switch happens at a block's first step, before the block's one logging step
    (its last), whose `on_train_batch_start` decides whether to attach the probe."""

    def __init__(self, block: int, hist_every: int, epoch_steps: int = 0) -> None:
        super().__init__(block, hist_every, epoch_steps=epoch_steps)
        self.probe_seconds = 0.0
        self._clock_probe()

    def step_start(self, trainer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % self.block:
            return
        if self.monitor is None:
            from gradwatch.monitor import GradientMonitor

            self.monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        on = self.monitor_in(step // self.block)
        self.monitor.log_activations = on
        self.starts.append(time.perf_counter())
        self.on.append(on)

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
