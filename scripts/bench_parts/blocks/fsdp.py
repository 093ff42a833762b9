"""The fsdp block (issue 18, only with --blocks): the GradientMonitor's cost under FSDP2 on 2 CPU
processes, in and out by turns of 50 steps inside one run (`scripts/bench_fsdp.py`).

Not in the default set: its two processes take both cores of a 2-core machine for about a
minute a repeat (the other blocks' contenders take one thread), so it is run on its own:
`make bench ARGS="--blocks fsdp"`."""

import os

from bench_parts.blocks import Specs


def contenders(quick: bool, notes: list[str]) -> Specs:
    specs = Specs("fsdp")
    if (os.cpu_count() or 1) < 2:
        notes.append("fsdp: skipped, it needs 2 cores for its 2 processes.")
        return specs
    specs.add(
        "monitor_ab",
        "FSDP2, 2 CPU processes: GradientMonitor defaults in and out by turns of 50 steps",
        "fsdp",
        {"steps": 1000 if quick else 3000},
        "monitor_ab",
    )
    return specs
