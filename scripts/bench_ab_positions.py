"""Where the monitor's in-run A/B overhead lands: gradwatch's own entry (`train(cfg)`) with the
monitor in and out of `trainer.callbacks` by turns of blocks of 50 steps (the bench's
Interleaver's turns), each step timed from one batch start to the next. Per position in a block
(49: the logging step) it prints the median step with the monitor minus the median without,
and the time inside the monitor's own hooks; then both summed over a block, as % of a block.

.venv/bin/python scripts/bench_ab_positions.py [Hydra overrides, e.g. trainer.max_epochs=20000]
"""

import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from gradwatch.model import MLPModule
from gradwatch.monitor import GradientMonitor
from gradwatch.train import train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BLOCK = 50
HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step")
HOOKS += ("on_train_batch_end",)
WARM_UP_BLOCKS = 8


class Recorder:
    """Each step's start and the monitor's hook time so far; the monitor in or out by turns."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, float]] = []  # (time, hook seconds so far)
        self.monitor_in: list[bool] = []
        self.hook_seconds = 0.0
        self.monitor: GradientMonitor | None = None

    def clock(self, hook: Any) -> Any:
        @functools.wraps(hook)
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - start

        return run

    def step_start(self, trainer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.starts.append((time.perf_counter(), self.hook_seconds))
        callbacks = trainer.callbacks
        if self.monitor is None:
            self.monitor = next(c for c in callbacks if isinstance(c, GradientMonitor))
        if step % BLOCK == 0:
            index = step // BLOCK
            on = (index % 2 == 1) == ((index // 2) % 2 == 0)  # the Interleaver's turns
            if on and self.monitor not in callbacks:
                callbacks.append(self.monitor)
            elif not on and self.monitor in callbacks:
                callbacks.remove(self.monitor)
        self.monitor_in.append(self.monitor in callbacks)


def by_position(recorder: Recorder) -> list[tuple[float, float, float]]:
    """Per position in a block: (median step without the monitor, with it minus without, mean
    hook time with it), in microseconds."""
    with_, without, hooks = {}, {}, {}
    starts = recorder.starts
    for i in range(WARM_UP_BLOCKS * BLOCK, len(starts) - 1):
        step_us = (starts[i + 1][0] - starts[i][0]) * 1e6
        hook_us = (starts[i + 1][1] - starts[i][1]) * 1e6
        position = i % BLOCK
        if recorder.monitor_in[i]:
            with_.setdefault(position, []).append(step_us)
            hooks.setdefault(position, []).append(hook_us)
        else:
            without.setdefault(position, []).append(step_us)
    rows = []
    for p in range(BLOCK):
        base = statistics.median(without[p])
        rows.append((base, statistics.median(with_[p]) - base, statistics.fmean(hooks[p])))
    return rows


def main(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    recorder = Recorder()
    for name in HOOKS:
        setattr(GradientMonitor, name, recorder.clock(getattr(GradientMonitor, name)))
    batch_start = MLPModule.on_train_batch_start

    def timed_start(module: MLPModule, *args: Any) -> Any:
        recorder.step_start(module.trainer)
        return batch_start(module, *args)

    MLPModule.on_train_batch_start = timed_start
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[f"paths.output_dir={tmp}", "print_every=0", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        train(cfg)
    rows = by_position(recorder)
    block_us = BLOCK * statistics.median(base for base, _, _ in rows)
    print("position: step with the monitor - without / its hooks, us")
    print(" ".join(f"{p}:{extra:+.0f}/{hook:.0f}" for p, (_, extra, hook) in enumerate(rows)))
    others = [(extra, hook) for _, extra, hook in rows[:-1]]
    extra_others = sum(extra for extra, _ in others)
    hook_others = sum(hook for _, hook in others)
    _, extra_last, hook_last = rows[-1]
    print(
        f"a block without the monitor: {block_us:.0f} us; with it, the {BLOCK - 1} other steps"
        f" +{extra_others:.0f} us (hooks {hook_others:.0f}), the logging step"
        f" +{extra_last:.0f} us (hooks {hook_last:.0f}); in all"
        f" {100 * (extra_others + extra_last) / block_us:.2f}% of a block"
        f" (hooks {100 * (hook_others + hook_last) / block_us:.2f}%)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
