"""The ablation block (a diagnostic, only with --blocks): where gradwatch's tutorial run spends
beyond a bare Trainer, one piece off at a time."""

from bench_parts.blocks import Specs


def contenders(quick: bool, notes: list[str]) -> Specs:
    epochs = 1000 if quick else 5000
    ep = [f"trainer.max_epochs={epochs}"]
    mon_off = ["callbacks.gradient_monitor=null"]
    specs = Specs("ablation")
    specs.add(
        "bare",
        "Lightning, bare Trainer",
        "lightning",
        {"epochs": epochs, "kind": "bare"},
        "bare",
    )
    variants = {
        "gw": ("gradwatch defaults", []),
        "gw_no_monitor": ("gradwatch, monitor off", mon_off),
        "gw_no_logger": ("gradwatch, logger=none", ["logger=none"]),
        "gw_no_ckpt": ("gradwatch, checkpoint off", ["callbacks.checkpoint=null"]),
        "gw_no_console": ("gradwatch, console off", ["callbacks.console=null"]),
        "gw_all_off": (
            "gradwatch, logger, checkpoint, console, monitor off",
            ["logger=none", "callbacks.checkpoint=null", "callbacks.console=null", *mon_off],
        ),
    }
    for name, (label, extra) in variants.items():
        specs.add(name, label, "gradwatch", {"overrides": ep + extra}, "bare")
    return specs
