"""The depth block: the monitored MLP at 3 to 100 layers of 64, with and without the monitor: how
the monitor's overhead grows with the number of parameters it watches. Run against run, and side
by side inside one run (`Interleaver`, four times the steps), which the target reads: overheads of
a few percent are lost in the 10 to 30% that whole runs move by here."""

from bench_parts.blocks import Specs

DEPTHS = (3, 10, 50, 100)


def contenders(quick: bool, notes: list[str]) -> Specs:
    steps = 250 if quick else 500
    specs = Specs("depth")
    for depth in DEPTHS:
        params = {"sizes": [64] + [64] * depth + [10], "samples": 128 * 250, "device": "cpu"}
        params["epochs"] = steps // 250
        specs.add(
            f"none_{depth}",
            f"{depth} layers, no monitor",
            "monitored",
            {**params, "kind": "none"},
            f"none_{depth}",
        )
        specs.add(
            f"monitor_{depth}",
            f"{depth} layers, GradientMonitor defaults",
            "monitored",
            {**params, "kind": "monitor"},
            f"none_{depth}",
        )
        specs.add(
            f"monitor_ab_{depth}",
            f"{depth} layers, GradientMonitor defaults in and out by turns of 50 steps",
            "monitored",
            {
                **params,
                "epochs": 4 * params["epochs"],
                "kind": "monitor",
                "interleave": {"block": 50, "hist_every": 500, "epoch_steps": 250},
            },
            f"none_{depth}",
        )
    return specs
