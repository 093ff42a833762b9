"""The wandb block: gradwatch and `wandb.watch` side by side, each against its own logger alone,
on the tutorial's XOR and on the mid block's MLP, measured by the in-run instrument of
`bench_parts.contender.steps` (every step's time, every process's CPU).

Equal work: `wandb.watch(log="all", log_freq=50)` draws every gradient and every weight as a
64-bin histogram every 50 steps; gradwatch's "all histograms" contenders draw the same (64 bins,
`histogram_min_values=1`, every 50 steps) and write its norms, update ratios and alerts besides.
Their baseline is a TensorBoardLogger alone, wandb's a WandbLogger (offline) alone: the logging
step of each includes its logger's own `train/loss`, which the baseline's logging step has too.

TensorBoard's writer checksums every record in pure Python unless something points it at C:
gradwatch's command line does (`gradwatch.overhead.use_fast_crc32c`), the library does not. The
TensorBoard contenders run as the command line writes (C checksums), and one more runs gradwatch
as a library in one's own Trainer (TensorBoard's own checksums), against the same baseline (the
baseline's own events are a few hundred bytes: their checksum is some microseconds either way).

Only where wandb is installed (`make install EXTRAS=bench`); it is never a dependency of
training or of the tests. The instrument resolves within one run, so the block runs 3 repeats
unless `--repeats` says otherwise: three runs show its spread.
"""

import importlib.util

from bench_parts.blocks import Specs, mid

REPEATS = 3
# Both tools' cadence: Lightning's log_every_n_steps, the monitor's scalars and (here) histograms,
# wandb.watch's log_freq.
EVERY = 50


def available() -> bool:
    try:
        return importlib.util.find_spec("wandb") is not None
    except ValueError:  # a half-imported module without a spec
        return False


def contenders(quick: bool, notes: list[str]) -> Specs:
    specs = Specs("wandb")
    if not available():
        notes.append(
            "wandb: not installed, the wandb block is skipped (`make install EXTRAS=bench`)."
        )
        return specs
    every_hist = {"histogram_every_n_steps": EVERY, "histogram_min_values": 1}
    tasks = {
        "xor": {"task": "xor", "epochs": 1000 if quick else 3000},
        "mid": {**mid.params(quick, "cpu"), "epochs": 1 if quick else 3},
    }
    for task, base in tasks.items():
        base = {**base, "steps": True}
        tb_base = {**base, "fast_crc": True}
        tb, wb = f"{task}_tb", f"{task}_wandb"
        specs.add(
            tb, f"{task}: TensorBoardLogger alone", "monitored", {**tb_base, "kind": "none"}, tb
        )
        specs.add(
            f"{task}_gw",
            f"{task}: gradwatch defaults",
            "monitored",
            {**tb_base, "kind": "monitor"},
            tb,
        )
        specs.add(
            f"{task}_gw_all",
            f"{task}: gradwatch, every gradient and weight histogram every {EVERY} steps",
            "monitored",
            {**tb_base, "kind": "monitor", "monitor": every_hist},
            tb,
        )
        specs.add(
            f"{task}_gw_all_lib",
            f"{task}: the same, TensorBoard's own checksums (the library in one's own Trainer)",
            "monitored",
            {**base, "kind": "monitor", "monitor": every_hist},
            tb,
        )
        if task == "mid":  # on XOR the recipe is the tutorial block's (self.log every step)
            specs.add(
                f"{task}_recipe",
                f"{task}: Lightning grad_norm recipe, TensorBoard",
                "monitored",
                {**tb_base, "kind": "recipe"},
                tb,
            )
        specs.add(
            wb,
            f"{task}: WandbLogger alone (offline)",
            "monitored",
            {**base, "kind": "none", "logger": "wandb"},
            tb,
        )
        specs.add(
            f"{task}_watch",
            f'{task}: wandb.watch(log="all", log_freq={EVERY}), WandbLogger',
            "monitored",
            {**base, "kind": "wandb", "logger": "wandb"},
            wb,
        )
    return specs
