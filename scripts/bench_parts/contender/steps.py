"""The instrument of the wandb block: every step's wall and CPU time, recorded inside the loop,
and the CPU time of every process of the run (wandb's service included).

Run against run, a contender's whole time moves by 10 to 30% on this shared machine, and two
tools' few percent are lost in that. Inside one run the steps that log can be set against the
steps that do not, a fraction of a second apart: `logging_excess` takes, at every logging step,
the extra time of that step and of the few after it (where asynchronous work lands: TensorBoard's
writer thread, wandb's sender and service) over the median step of the same run. The CPU clocks add
what a tool does off the training thread, in other threads and processes, which a wall clock on
a machine with a free core would never see.
"""

import os
import statistics
import time
from typing import Any


class StepClock:
    """Every step's start in wall time, in the training thread's CPU time and in the process's
    (all its threads: TensorBoard's writer, wandb's sender), taken in the module's own
    `on_train_batch_start` (like `LoopClock`, no extra callback is timed)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []
        self.end = (0.0, 0.0, 0.0)

    @staticmethod
    def now() -> tuple[float, float, float]:
        return time.perf_counter(), time.thread_time(), time.process_time()

    def mark(self) -> None:
        """At every step's start."""
        self.marks.append(self.now())

    def mark_end(self) -> None:
        """At every step's end: the last one closes the last step."""
        self.end = self.now()

    def durations(self) -> dict[str, list[float]]:
        """Each step's wall, training-thread CPU and process CPU time: from its start to the next
        one's (the last: to its end), so a step holds all that runs between two batches."""
        ends = [*self.marks[1:], self.end]
        out = {}
        for i, clock in enumerate(("wall", "thread_cpu", "process_cpu")):
            out[clock] = [b[i] - a[i] for a, b in zip(self.marks, ends, strict=True)]
        return out


STEPS = StepClock()


def logging_excess(times: list[float], every: int, window: int = 5) -> dict[str, Any]:
    """The extra time of the logging steps over the run's median step.

    Logging steps are those with (step + 1) % every == 0 (Lightning's and both tools' cadence).
    For each one, the window of `window` steps from it (the step itself and the steps where
    asynchronous work lands) is summed less `window` median steps; the median step is taken over
    the steps outside every window. The first logging step is left out (one-off set-up: the
    writer's first event, wandb's first histogram). The control: the same window half an interval
    later, where no tool logs. On a shared machine any window may hold a step that another
    process preempted: the control's windows catch that too, so the estimate is the windows'
    trimmed mean (`trimmed_mean`) less the controls' (`extra_ms`), with the standard error of
    the plain means (`spread_ms`). The median window (`median_ms`) is more robust still, and
    blind to a tool's own occasional long logging step.

    Returns, in milliseconds but for the counts and `extra_pct` (the extra as a share of one
    logging interval of median steps): also the control's mean, the median step, and the median
    excess by offset from the logging step (which step pays: `by_offset_ms`)."""
    logging = [s for s in range(every - 1, len(times) - window, every)][1:]
    in_window = {s + j for s in logging for j in range(window)}
    quiet = [t for i, t in enumerate(times) if i >= every and i not in in_window]
    if len(logging) < 2 or not quiet:
        return {}
    base = statistics.median(quiet)

    def excess(start: int) -> float:
        return sum(times[start + j] - base for j in range(window))

    windows = [excess(s) for s in logging]
    controls = [excess(s + every // 2) for s in logging if s + every // 2 + window <= len(times)]
    extra = trimmed_mean(windows) - trimmed_mean(controls)
    spread = (
        statistics.variance(windows) / len(windows) + statistics.variance(controls) / len(controls)
    ) ** 0.5
    return {
        "logging_steps": len(windows),
        "window": window,
        "median_step_ms": 1e3 * base,
        "extra_ms": 1e3 * extra,
        "spread_ms": 1e3 * spread,
        "median_ms": 1e3 * statistics.median(windows),
        "control_ms": 1e3 * trimmed_mean(controls),
        "by_offset_ms": [
            1e3 * statistics.median(times[s + j] - base for s in logging) for j in range(window)
        ],
        "extra_pct": 100 * extra / (every * base),
        "windows_ms": [round(1e3 * w, 4) for w in windows],
    }


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """The mean of the values less the lowest and highest `cut` of them: a window's cost has a
    real tail (a garbage collection that the logging step's allocations set off), and a few
    windows hold a step that another process or the hypervisor preempted for tens of ms."""
    k = int(len(values) * cut)
    kept = sorted(values)[k : len(values) - k]
    return statistics.fmean(kept)


def _stat(pid: str) -> tuple[int, list[str]] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None  # gone since the listing
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields


def process_tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system, reaped children's included) of this process and of every
    process below it, by pid, from /proc: wandb's service, started by `wandb.init`, is a child."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(entry)
        if stat is None:
            continue
        ppid, f = stat
        parents[int(entry)] = ppid
        # utime, stime, cutime, cstime: fields 14 to 17 of stat, 11 to 14 after the command.
        cpu[int(entry)] = sum(int(x) for x in f[11:15]) / tick
    me = os.getpid()
    tree, frontier = {me}, [me]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, pp in parents.items() if pp == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return {pid: cpu[pid] for pid in tree if pid in cpu}


class CpuMarks:
    """CPU seconds of the training process and of the other processes of its tree between two
    marks. A process that ends before the second mark is counted by its parent's reaped
    children's time, when the parent is in the tree; one that is started and ends in between
    without its parent waiting for it is missed (none here: wandb's service outlives the run)."""

    def __init__(self) -> None:
        self.start: dict[int, float] = {}

    def mark_start(self) -> None:
        self.start = process_tree_cpu()

    def since_start(self) -> dict[str, float]:
        now = process_tree_cpu()
        me = os.getpid()
        main = now.get(me, 0.0) - self.start.get(me, 0.0)
        others = sum(v - self.start.get(pid, 0.0) for pid, v in now.items() if pid != me)
        return {"cpu_main": main, "cpu_others": others, "cpu_all": main + others}


CPU = CpuMarks()
