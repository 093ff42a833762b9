"""Which contenders each block runs: one module per block, each with `contenders(quick, notes)`.

A contender spec: block, name, label, runner (see `bench_parts.contender.RUNNERS`), params (what
the runner gets) and baseline (the name, in the same block, its ratios are against).
"""

import importlib
from typing import Any

BLOCKS = ("tutorial", "mid", "depth", "gpu", "wandb")
# Selectable with --blocks, not run by default: diagnostics rather than results (ablation), and
# a block that takes every core of a 2-core machine (fsdp).
EXTRA_BLOCKS = ("ablation", "fsdp")


def contenders(block: str, quick: bool, notes: list[str]) -> list[dict[str, Any]]:
    """Every contender of `block`, in the order they run in a round; notes gets what is skipped."""
    if block not in BLOCKS + EXTRA_BLOCKS:
        raise ValueError(
            f"--blocks: unknown block {block!r}; choose from {', '.join(BLOCKS + EXTRA_BLOCKS)}"
        )
    return importlib.import_module(f"{__name__}.{block}").contenders(quick, notes)


def block_default_repeats(block: str, repeats: int) -> int:
    """The block's own number of repeats when `--repeats` is not given (its module's REPEATS),
    else the run's; never more than the run's (`--quick`'s 2 stay 2)."""
    own = getattr(importlib.import_module(f"{__name__}.{block}"), "REPEATS", repeats)
    return min(own, repeats)


class Specs(list[dict[str, Any]]):
    """One block's contender specs, in order."""

    def __init__(self, block: str) -> None:
        super().__init__()
        self.block = block

    def add(self, name: str, label: str, runner: str, params: dict[str, Any], base: str) -> None:
        self.append(
            {
                "block": self.block,
                "name": name,
                "label": label,
                "runner": runner,
                "params": params,
                "baseline": base,
            }
        )
