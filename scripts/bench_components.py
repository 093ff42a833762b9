"""What each part of gradwatch's default run costs per epoch, in one process, variants interleaved.

.venv/bin/python scripts/bench_components.py --epochs 500 --rounds 5

The tutorial's run is 5000 one-step epochs, so a part's cost per epoch is its cost. Every variant
runs `rounds` times, round-robin (ABCABC...), in this one process (imports and warm-up shared);
the minimum loop time over rounds is the least disturbed by other load, the median is shown too.
"""

import argparse
import statistics

import torch
from bench_parts.contender.xor import run_gradwatch, run_lightning_xor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ep = [f"trainer.max_epochs={args.epochs}"]
    monitor = ["callbacks.gradient_monitor=null"]
    off = ["logger=none", "callbacks.checkpoint=null", "callbacks.console=null", *monitor]
    variants = {
        "Lightning bare Trainer": ("bare", []),
        "gradwatch, all off": ("gw", off),
        "+ TensorBoard logger": ("gw", [o for o in off if not o.startswith("logger")]),
        "+ console": ("gw", [o for o in off if "console" not in o]),
        "+ checkpoint": ("gw", [o for o in off if "checkpoint" not in o]),
        "+ monitor": ("gw", [o for o in off if "monitor" not in o]),
        "gradwatch defaults": ("gw", []),
    }
    loops: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (kind, extra) in variants.items():
            if kind == "bare":
                r = run_lightning_xor({"epochs": args.epochs, "kind": "bare"})
            else:
                r = run_gradwatch({"overrides": ep + extra})
            loops[name].append(r["loop"])
    base = min(loops["Lightning bare Trainer"])
    print(f"\n{args.epochs} epochs, {args.rounds} rounds; per epoch in microseconds")
    print(f"{'variant':<28}{'min us/ep':>11}{'median':>9}{'vs bare':>9}")
    for name, times in loops.items():
        lo, med = min(times), statistics.median(times)
        print(
            f"{name:<28}{1e6 * lo / args.epochs:>11.0f}{1e6 * med / args.epochs:>9.0f}"
            f"{lo / base:>9.2f}x"
        )


if __name__ == "__main__":
    main()
