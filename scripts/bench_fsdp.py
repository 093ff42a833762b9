"""The gradient monitor's cost under FSDP2 (trainer=fsdp) on 2 CPU processes, A/B inside one run.

    python scripts/bench_fsdp.py [--steps 3000] [--out fsdp_bench.json]
    make bench ARGS="--blocks fsdp"     # the same, repeated, with its target (< 3%)

An MLP of 2-256-256-2 on moons, `fully_shard` per layer (MLPModule.configure_model), Lightning's
ModelParallelStrategy over gloo; Lightning starts the second process by running this script
again. The monitor runs at its defaults (scalars every 50 steps, histograms every 500) in every
other window of 50 steps and is switched off in the others, so both halves share the machine's
moods; each window holds one logging step. The cost is the mean step time of the windows with
the monitor over that of the windows without (steps timed from one batch start to the next, on
rank zero: the collectives keep the ranks in step); the same from each pair of windows' last two
steps alone, where the monitor does all its work, which leaves the other steps' noise out; and,
as a cross-check free of that noise, the time inside the monitor's own hooks as a share of its
windows' time.
"""

import argparse
import json
import math
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy

from gradwatch.data import InMemoryDataModule
from gradwatch.model import MLPModule
from gradwatch.monitor import GradientMonitor

WINDOW = 50  # steps; one logging step each, at the monitor's default cadence
WARM_UP_WINDOWS = 2


class InterleavedMonitor(GradientMonitor):
    """The monitor, on in odd windows of WINDOW steps (so the histogram steps, every 500, fall in
    them) and off in even ones; times every step and its own hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, bool, float]] = []  # (step, monitor on, seconds)
        self.hook_seconds = 0.0
        self._last_start: float | None = None
        self.cpu_first: float | None = None  # the process's CPU time at the first and last step
        self.cpu_last = 0.0
        self._on_train = True

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._on_train = self._enabled

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        self.cpu_last = time.process_time()
        if self.cpu_first is None:
            self.cpu_first = self.cpu_last
        step = trainer.global_step
        if self._last_start is not None:
            self.steps.append((step - 1, self._enabled, now - self._last_start))
        self._last_start = now
        self._enabled = self._on_train and (step // WINDOW) % 2 == 1
        # The monitor's own batch start (its activation hooks on a logging step), while on.
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._enabled:
            self.hook_seconds += time.perf_counter() - now

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._enabled:
            self.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._enabled:
            self.hook_seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default="fsdp_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    monitor = InterleavedMonitor()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=args.steps,
        log_every_n_steps=WINDOW,
        logger=TensorBoardLogger(tempfile.mkdtemp(), name="", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = InMemoryDataModule("moons", batch_size=128, n_samples=12_800, noise=0.1)
    model = MLPModule(layer_sizes=[2, 256, 256, 2], activation="relu", loss="cross_entropy")
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return
    kept = [(on, s) for step, on, s in monitor.steps if step >= WARM_UP_WINDOWS * WINDOW]
    with_monitor = [s for on, s in kept if on]
    without = [s for on, s in kept if not on]
    on_mean, off_mean = statistics.fmean(with_monitor), statistics.fmean(without)
    # Each window's mean, so the spread between windows shows what one number can resolve.
    windows: dict[int, list[float]] = {}
    for step, _, s in monitor.steps:
        if step >= WARM_UP_WINDOWS * WINDOW:
            windows.setdefault(step // WINDOW, []).append(s)
    # Each window with the monitor against the window before it: the machine's moods last longer
    # than a window, so a pair shares most of them.
    paired = [
        statistics.fmean(v) / statistics.fmean(windows[w - 1]) - 1
        for w, v in windows.items()
        if w % 2 == 1 and w - 1 in windows
    ]

    # The monitor works on a window's logging step (its last) and nowhere else: each pair's last
    # two steps with it against those without, their mean over pairs, leaves the other 48 steps'
    # noise out of the difference (the mean: a histogram step, every 500, is in one pair of ten).
    def tail(w: int) -> float | None:
        last = [
            s for step, _, s in monitor.steps if step // WINDOW == w and step % WINDOW >= WINDOW - 2
        ]
        return sum(last) if len(last) == 2 else None

    tails = [(tail(w), tail(w - 1)) for w in windows if w % 2 == 1 and w - 1 in windows]
    tail_diffs = [a - b for a, b in tails if a is not None and b is not None]
    # What the difference of the two means can resolve: its standard error, from the windows.
    on_windows = [statistics.fmean(v) for w, v in windows.items() if w % 2 == 1]
    off_windows = [statistics.fmean(v) for w, v in windows.items() if w % 2 == 0]
    error = math.sqrt(
        statistics.variance(on_windows) / len(on_windows)
        + statistics.variance(off_windows) / len(off_windows)
    )
    result = {
        "steps": args.steps,
        "fit_seconds": fit_seconds,
        # Every timed step, first batch start to last (rank zero), on the wall and the CPU clock.
        "loop_seconds": sum(s for _, _, s in monitor.steps),
        "loop_cpu_seconds": monitor.cpu_last - (monitor.cpu_first or 0.0),
        "step_ms_with_monitor": 1e3 * on_mean,
        "step_ms_without": 1e3 * off_mean,
        "monitor_cost_pct": 100 * (on_mean / off_mean - 1),
        "monitor_cost_standard_error_pct": 100 * error / off_mean,
        "paired_windows_median_pct": 100 * statistics.median(paired),
        "hooks_pct_of_monitored_time": 100 * monitor.hook_seconds / sum(with_monitor),
        "logging_steps_cost_pct": 100 * statistics.fmean(tail_diffs) / (WINDOW * off_mean),
        "logging_steps_standard_error_pct": 100
        * statistics.stdev(tail_diffs)
        / math.sqrt(len(tail_diffs))
        / (WINDOW * off_mean),
        "window_means_ms": {w: 1e3 * statistics.fmean(v) for w, v in sorted(windows.items())},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"FSDP2, 2 CPU processes: {off_mean * 1e3:.3f} ms a step without the monitor, "
        f"{on_mean * 1e3:.3f} ms with it: {result['monitor_cost_pct']:+.2f}% "
        f"(+/- {result['monitor_cost_standard_error_pct']:.2f}, in-run A/B; paired windows' "
        f"median {result['paired_windows_median_pct']:+.2f}%); its own hooks "
        f"{result['hooks_pct_of_monitored_time']:.2f}% of those steps; the windows' logging steps"
        f" alone {result['logging_steps_cost_pct']:+.2f}%"
        f" (+/- {result['logging_steps_standard_error_pct']:.2f})"
    )


if __name__ == "__main__":
    main()
