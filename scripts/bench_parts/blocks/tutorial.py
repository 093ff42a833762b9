"""The tutorial block: the tutorial's XOR run (DESIGN.md) as a plain loop, in Lightning (bare,
default, with the grad_norm recipe) and in gradwatch, with and without its monitor, and the
monitor's overhead side by side inside one run (see `Interleaver`)."""

from bench_parts.blocks import Specs


def contenders(quick: bool, notes: list[str]) -> Specs:
    epochs = 1000 if quick else 5000
    base = "plain"
    specs = Specs("tutorial")
    specs.add("plain", "plain PyTorch loop", "plain", {"epochs": epochs}, base)
    specs.add(
        "default",
        "Lightning, default setup",
        "lightning",
        {"epochs": epochs, "kind": "default"},
        base,
    )
    specs.add(
        "recipe",
        "Lightning default + grad_norm recipe",
        "lightning",
        {"epochs": epochs, "kind": "recipe"},
        base,
    )
    # The bare Trainer runs next to gradwatch (rounds go ABC, CBA): the target compares the two
    # by their ratio in each round, which the minute-long default and recipe runs would separate.
    specs.add(
        "bare", "Lightning, bare Trainer", "lightning", {"epochs": epochs, "kind": "bare"}, base
    )
    ep = [f"trainer.max_epochs={epochs}"]
    specs.add("gradwatch", "gradwatch defaults", "gradwatch", {"overrides": ep}, base)
    specs.add(
        "gradwatch_nomon",
        "gradwatch, callbacks.gradient_monitor=null",
        "gradwatch",
        {"overrides": ep + ["callbacks.gradient_monitor=null"]},
        base,
    )
    # Every tensor's histograms, as these rows say: the tutorial's (1 to 4 values) are all under
    # the default histogram_min_values.
    hist50 = [
        "callbacks.gradient_monitor.histogram_every_n_steps=50",
        "callbacks.gradient_monitor.histogram_min_values=1",
    ]
    specs.add(
        "gradwatch_hist50",
        "gradwatch, every histogram every 50 steps",
        "gradwatch",
        {"overrides": ep + hist50},
        base,
    )
    # The monitor's overhead side by side inside one run (see Interleaver).
    specs.add(
        "gradwatch_ab",
        "gradwatch defaults, monitor in and out by turns of 50 steps",
        "gradwatch",
        {"overrides": ep, "interleave": {"block": 50, "hist_every": 500}},
        base,
    )
    specs.add(
        "gradwatch_hist50_ab",
        "gradwatch, histograms every 50 steps, monitor in and out by turns",
        "gradwatch",
        {
            "overrides": ep + hist50,
            "interleave": {"block": 50, "hist_every": 50},
        },
        base,
    )
    every_step = ["callbacks.gradient_monitor.every_step=true"]
    specs.add(
        "gradwatch_every_step",
        "gradwatch, every_step=true",
        "gradwatch",
        {"overrides": ep + every_step},
        base,
    )
    specs.add(
        "gradwatch_every_step_ab",
        "gradwatch, every_step=true, monitor in and out by turns",
        "gradwatch",
        {"overrides": ep + every_step, "interleave": {"block": 50, "hist_every": 500}},
        base,
    )
    specs.add(
        "noop_callback_ab",
        "gradwatch defaults + a Callback that does nothing, in and out by turns",
        "gradwatch",
        {"overrides": ep, "interleave": {"block": 50, "hist_every": 0, "noop": True}},
        base,
    )
    return specs
