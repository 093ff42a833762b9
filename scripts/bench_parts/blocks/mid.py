"""The mid block: an MLP of 784-128-128-10 on 60,000 rows (MNIST's size, synthetic), with no
monitor, GradientMonitor at its defaults and at heavier settings, Lightning's grad_norm recipe
(wandb.watch is the wandb block's), and the monitor's overhead side by side inside one run (see
`Interleaver`). The gpu block is the same on CUDA."""

from typing import Any

from bench_parts.blocks import Specs


def params(quick: bool, device: str) -> dict[str, Any]:
    """What every contender of the block shares: the model, the data, the epochs, the device."""
    mid: dict[str, Any] = {
        "sizes": [784, 128, 128, 10],
        "samples": 60_000,
        "epochs": 1 if quick else 2,
    }
    mid["device"] = device
    return mid


def contenders(quick: bool, notes: list[str], block: str = "mid", device: str = "cpu") -> Specs:
    mid = params(quick, device)
    specs = Specs(block)
    specs.add("none", "no monitor", "monitored", {**mid, "kind": "none"}, "none")
    specs.add(
        "monitor", "GradientMonitor defaults", "monitored", {**mid, "kind": "monitor"}, "none"
    )
    specs.add(
        "norms_every_step",
        "GradientMonitor, norms every step",
        "monitored",
        {
            **mid,
            "kind": "monitor",
            "monitor": {"log_every_n_steps": 1, "histogram_every_n_steps": 0},
        },
        "none",
    )
    specs.add(
        "every_step",
        "GradientMonitor, every_step=true",
        "monitored",
        {**mid, "kind": "monitor", "monitor": {"every_step": True}},
        "none",
    )
    # "All histograms": histogram_min_values=1 draws the 10-value output bias too.
    specs.add(
        "hist_50",
        "GradientMonitor, all histograms every 50 steps",
        "monitored",
        {
            **mid,
            "kind": "monitor",
            "monitor": {"histogram_every_n_steps": 50, "histogram_min_values": 1},
        },
        "none",
    )
    specs.add(
        "recipe", "Lightning grad_norm recipe", "monitored", {**mid, "kind": "recipe"}, "none"
    )
    # The monitor's overhead side by side inside one run (see Interleaver): twice the steps,
    # for twice the pairs of blocks.
    ab = {**mid, "epochs": 2 * mid["epochs"], "kind": "monitor"}
    epoch_steps = -(-mid["samples"] // 128)
    specs.add(
        "monitor_ab",
        "GradientMonitor defaults, in and out by turns of 50 steps",
        "monitored",
        {**ab, "interleave": {"block": 50, "hist_every": 500, "epoch_steps": epoch_steps}},
        "none",
    )
    specs.add(
        "hist_50_ab",
        "histograms every 50 steps, in and out by turns",
        "monitored",
        {
            **ab,
            "monitor": {"histogram_every_n_steps": 50, "histogram_min_values": 1},
            "interleave": {"block": 50, "hist_every": 50, "epoch_steps": epoch_steps},
        },
        "none",
    )
    specs.add(
        "every_step_ab",
        "every_step=true, in and out by turns",
        "monitored",
        {
            **ab,
            "monitor": {"every_step": True},
            "interleave": {"block": 50, "hist_every": 500, "epoch_steps": epoch_steps},
        },
        "none",
    )
    # What every_step cannot go below: its norms alone, every step, by the same turns.
    specs.add(
        "norms_only_ab",
        "every step's gradient norms alone (a Callback of one foreach kernel), in and out by turns",
        "monitored",
        {
            **ab,
            "kind": "none",
            "interleave": {
                "block": 50,
                "hist_every": 0,
                "norms_only": True,
                "epoch_steps": epoch_steps,
            },
        },
        "none",
    )
    # The activation statistics alone: the monitor in every block, its activation statistics on
    # and off by the same turns (see ActivationInterleaver); twice the A/B's steps again, since
    # the difference to resolve is a fraction of a percent.
    specs.add(
        "activations_ab",
        "GradientMonitor defaults, activation statistics in and out by turns of 50 steps",
        "monitored",
        {
            **ab,
            "epochs": 4 * mid["epochs"],
            "interleave": {
                "switch": "activations",
                "block": 50,
                "hist_every": 500,
                "epoch_steps": epoch_steps,
            },
        },
        "none",
    )
    return specs
