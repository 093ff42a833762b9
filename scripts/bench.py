"""Benchmark gradwatch against plain PyTorch, bare and default Lightning, and other gradient tools.

make bench                                  # every block this machine can run, 7 repeats
make bench ARGS="--quick"                   # 2 repeats, shorter runs: a smoke test, not a result
.venv/bin/python scripts/bench.py --blocks tutorial,mid --repeats 7 --out outputs/bench

Every contender runs in its own process (`bench.py --contender '<json>'`), contenders alternate
within a block, in rounds (ABC CBA ABC..., never AAABBB, so drifting machine load hits all of them
alike), and the table shows medians and ratios against the block's baseline. The targets compare
two contenders by the median of their per-round ratios: a round's runs are seconds apart, so a
slow minute on a shared machine cancels out of the ratio instead of landing on one side of it.
A contender prints one JSON line with its own timings: `fit` is `trainer.fit` (for the plain
loop: the loop), `loop` is the training steps alone (first step start to last step end, without the
end-of-training work); the parent times the whole process (interpreter start and imports
included). Every process runs with the same number of torch threads (`--threads`, default 1: the
tutorial's "1 s on one CPU core", and the least sensitive to other load on a shared machine).

Writes `bench_results.json` and `bench_results.md` under `--out` (default outputs/bench/).
The top level imports only the standard library: the plain contender's process time is the
plain script's.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
MARK = "BENCH_RESULT "
BLOCKS = ("tutorial", "mid", "depth", "gpu")
# Selectable with --blocks, not run by default: diagnostics rather than results.
EXTRA_BLOCKS = ("ablation",)
DEPTHS = (3, 10, 50, 100)
METRICS = ("fit", "loop", "loop_cpu", "process")


# ------------------------------------------------------------------------------------------------
# Contender side: each function runs in its own process and returns its timings.
# ------------------------------------------------------------------------------------------------


def _xor_data() -> tuple[Any, Any]:
    import torch

    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    return x, y


def run_plain(p: dict[str, Any]) -> dict[str, float]:
    """The tutorial's loop (DESIGN.md), as a user would write it."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 2)
            self.fc2 = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.sigmoid(self.fc1(x)))

    x, y = _xor_data()
    model = Net()
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(p["epochs"]):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 500 == 0:
            print(f"Epoch {epoch + 1}, Loss: {loss.item()}")
    fit, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(model.fc1.weight.grad)
    return {"fit": fit, "loop": fit, "loop_cpu": cpu}


class LoopClock:
    """Times the training steps alone (first step start to last step end) from the module's own
    `on_train_batch_start`/`on_train_batch_end`: Lightning calls those hooks whether or not they
    are overridden, so unlike an extra callback (about 12 us per epoch of dispatch) it adds
    nothing to what is measured."""

    def __init__(self) -> None:
        self.start = self.end = self.cpu_start = self.cpu_end = None

    def batch_start(self) -> None:
        if self.start is None:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def batch_end(self) -> None:
        self.end, self.cpu_end = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return (self.end or 0.0) - (self.start or 0.0)

    @property
    def cpu_seconds(self) -> float:
        # CPU time of the process (all its threads); wall time is the measure, this a cross-check.
        return (self.cpu_end or 0.0) - (self.cpu_start or 0.0)


CLOCK = LoopClock()


class MonitorHookTimer:
    """Wall time inside the GradientMonitor's per-step hooks, in this process: the monitor's own
    share of the very run that is timed. Lightning's dispatch of the hooks (a few us a step, paid
    by any callback) and the TensorBoard writer thread's work are outside it; the side-by-side
    ratios include them."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        from gradwatch.monitor import GradientMonitor

        for name in ("on_before_optimizer_step", "on_train_batch_end"):
            hook = getattr(GradientMonitor, name)

            def timed(self: Any, *args: Any, _hook: Any = hook) -> None:
                start = time.perf_counter()
                try:
                    _hook(self, *args)
                finally:
                    cls.seconds += time.perf_counter() - start

            setattr(GradientMonitor, name, timed)


class Interleaver:
    """The monitor's overhead side by side inside one run: steps go in blocks of the monitor's
    scalar cadence (each block ends with one logging step), blocks in pairs, and the monitor is in
    `trainer.callbacks` for one block of each pair and out of it for the other (the second block
    of even pairs, the first of odd ones: see `monitor_in`). Adjacent blocks are tens of
    milliseconds apart, so the machine's drift, which moves whole runs by 10 to 30% here, divides
    out. Lightning's dispatch of the monitor's hooks is inside the difference, as in a run with
    and without it.

    The estimate: the median over pairs of (block with - block without), the pairs whose block
    with the monitor holds a histogram step apart, weighted by how many there are, over the median
    block without. One-off costs (the first logging step's warm-up) are left out: per-step cost.
    So are pairs where the run does work of its own on one side only: an epoch's start, when
    epochs are longer than a block, and a checkpoint save (`checkpoint_every`)."""

    def __init__(
        self,
        block: int,
        hist_every: int,
        noop: bool = False,
        epoch_steps: int = 0,
        checkpoint_every: int = 0,
    ) -> None:
        self.block, self.hist_every = block, hist_every
        # Epochs longer than a block start inside one (the mid block's shuffle of 60,000 rows
        # takes 140 ms): pairs holding an epoch's first step are left out.
        self.epoch_steps = epoch_steps if epoch_steps > block else 0
        # A save of last.ckpt takes ~3 ms, a tenth of a tutorial block: counted, it would be the
        # monitor's cost whenever it fell on the monitor's side (+1% for a monitor that does
        # nothing, measured in the tutorial run).
        self.checkpoint_every = checkpoint_every
        # noop: a Callback that does nothing takes the monitor's place, in and out by the same
        # turns: what Lightning's dispatch of any callback's hooks costs.
        self.monitor: Any = None
        if noop:
            from lightning.pytorch import Callback

            self.monitor = Callback()
        self.starts: list[float] = []
        self.on: list[bool] = []

    def step_start(self, trainer: Any) -> None:
        """Called from the module's own on_train_batch_start, at every step."""
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % self.block:
            return
        if self.monitor is None:
            from gradwatch.monitor import GradientMonitor

            self.monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        on = self.monitor_in(step // self.block)
        # Between callback hooks (this runs in the module's own hook): no list is being walked.
        callbacks = trainer.callbacks
        if on and self.monitor not in callbacks:
            callbacks.append(self.monitor)
        elif not on and self.monitor in callbacks:
            callbacks.remove(self.monitor)
        self.starts.append(time.perf_counter())
        self.on.append(on)

    @staticmethod
    def monitor_in(index: int) -> bool:
        """Whether block ``index`` runs with the monitor: 1, 2, 5, 6, 9, 10, ... With the
        defaults' cadences (blocks of 50 steps, histograms every 500, a checkpoint every 1000)
        the histogram steps 499, 1499, ... fall in blocks with the monitor (9, 29, ...), and
        999, 1999, ... in blocks without it, in pairs left out for their checkpoint save."""
        return (index % 2 == 1) == ((index // 2) % 2 == 0)

    def pairs(self) -> list[tuple[int, int, bool]]:
        """The pairs of blocks the estimate uses: (block with, block without, has a histogram
        step), for every pair of the run but those left out."""
        out = []
        for pair in range(len(self.on) // 2):
            a, b = 2 * pair, 2 * pair + 1
            first, last = a * self.block, (b + 1) * self.block  # the pair's steps
            # An epoch starting at step s runs its set-up (the shuffle) before s, and a checkpoint
            # is saved after step s - 1 when s is a multiple of its cadence: both in s - 1's block.
            cadences = (self.epoch_steps, self.checkpoint_every)
            if any(every and first // every != last // every for every in cadences):
                continue
            with_, without = (a, b) if self.on[a] else (b, a)
            # The block's last step writes histograms when (step + 1) is a multiple of the cadence.
            has_hist = bool(self.hist_every) and ((with_ + 1) * self.block) % self.hist_every == 0
            out.append((with_, without, has_hist))
        return out

    def overhead_pct(self, end: float) -> float:
        times = [b - a for a, b in zip(self.starts, [*self.starts[1:], end], strict=True)]
        normal, hist, without = [], [], []
        for with_, without_, has_hist in self.pairs():
            (hist if has_hist else normal).append(times[with_] - times[without_])
            without.append(times[without_])
        extra = sum(statistics.median(group) * len(group) for group in (normal, hist) if group)
        return 100 * extra / (len(normal) + len(hist)) / statistics.median(without)


class _OneBatch:
    """A list of batches as one loader: iterating gives the list's items, nothing else."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def run_lightning_xor(p: dict[str, Any]) -> dict[str, float]:
    """XOR in Lightning: `bare` (no logger, checkpoint, bar or summary; the batch from a list),
    `default` (DataLoader, self.log every step, TensorBoard, a checkpoint every epoch, the bar),
    `recipe` (default + Lightning's grad_norm/log_dict recipe every step)."""
    import warnings

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.utilities import grad_norm
    from torch import nn

    warnings.filterwarnings("ignore")
    kind = p["kind"]
    pl.seed_everything(0, verbose=False)
    CLOCK.__init__()

    class XorModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 2)
            self.fc2 = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.sigmoid(self.fc1(x)))

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            loss = F.mse_loss(self(x), y)
            if kind != "bare":
                self.log("train_loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
            if kind == "recipe":
                self.log_dict(grad_norm(self, norm_type=2))

        def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: ANN001
            CLOCK.batch_start()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            CLOCK.batch_end()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = _xor_data()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "bare":
            # The plain list [(x, y)], wrapped: Lightning reads a bare list as several loaders.
            data: Any = _OneBatch([(x, y)])
            trainer = pl.Trainer(
                max_epochs=p["epochs"],
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=tmp,
            )
        else:
            data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
            trainer = pl.Trainer(
                max_epochs=p["epochs"],
                accelerator="cpu",
                devices=1,
                logger=pl.loggers.TensorBoardLogger(tmp),
                callbacks=[pl.callbacks.ModelCheckpoint()],
                default_root_dir=tmp,
            )
        model = XorModule()
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=data)
        fit = time.perf_counter() - start
    return {"fit": fit, "loop": CLOCK.seconds, "loop_cpu": CLOCK.cpu_seconds}


def run_gradwatch(p: dict[str, Any]) -> dict[str, float]:
    """gradwatch's real entry, `train(cfg)`, composed by Hydra as the command line would."""
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from gradwatch.model import MLPModule
    from gradwatch.train import train

    # `fit` is timed around `trainer.fit`, as for the Lightning contenders. gradwatch's own
    # `fit_seconds` (kept as `fit_reported`) runs from on_train_start to its on_train_end, before
    # the other callbacks' end-of-training work (the monitor's summary and plot, last.ckpt).
    fit_times: list[float] = []
    trainer_fit = pl.Trainer.fit

    def timed_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return trainer_fit(self, *args, **kwargs)
        finally:
            fit_times.append(time.perf_counter() - start)

    pl.Trainer.fit = timed_fit
    # The loop clock in the module's own hooks, around whatever MLPModule does there.
    batch_start, batch_end = MLPModule.on_train_batch_start, MLPModule.on_train_batch_end

    interleave = Interleaver(**p["interleave"]) if "interleave" in p else None

    def timed_start(self: Any, *args: Any) -> Any:
        if interleave is not None:
            interleave.step_start(self.trainer)
        CLOCK.batch_start()
        return batch_start(self, *args)

    def timed_end(self: Any, *args: Any) -> None:
        batch_end(self, *args)
        CLOCK.batch_end()

    MLPModule.on_train_batch_start, MLPModule.on_train_batch_end = timed_start, timed_end
    CLOCK.__init__()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"paths.output_dir={tmp}"]
        overrides += p.get("overrides", [])
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        if interleave is not None and cfg.callbacks.get("checkpoint") is not None:
            interleave.checkpoint_every = cfg.callbacks.checkpoint.every_n_train_steps
        metrics = train(cfg)
    loop, cpu = CLOCK.seconds, CLOCK.cpu_seconds
    pl.Trainer.fit = trainer_fit
    MLPModule.on_train_batch_start, MLPModule.on_train_batch_end = batch_start, batch_end
    fit = fit_times[-1]
    out = {
        "fit": fit,
        "fit_reported": metrics["fit_seconds"],
        "loop": loop,
        "loop_cpu": cpu,
        "monitor_hooks": MonitorHookTimer.seconds,
    }
    if interleave is not None:
        out["interleaved_pct"] = interleave.overhead_pct(CLOCK.end)
    return out


def _synthetic(n: int, n_in: int, n_out: int, device: str) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, n_in, generator=gen)
    y = torch.randint(0, n_out, (n,), generator=gen)
    return x.to(device), y.to(device)


def _sync_guard(every: int) -> Any:
    """Turns `torch.cuda.set_sync_debug_mode("error")` on for every step that writes nothing
    (from the step's start to its end, Lightning's own code included): a host sync raises."""
    import lightning.pytorch as pl
    import torch

    class SyncGuard(pl.Callback):
        checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            if (step + 1) % every != 0 and step % every != 0:
                torch.cuda.set_sync_debug_mode("error")
                SyncGuard.checked += 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            torch.cuda.set_sync_debug_mode(0)

    return SyncGuard()


def run_monitored(p: dict[str, Any]) -> dict[str, float]:
    """The mid, depth and gpu blocks: one minimal LightningModule (an MLP on in-memory slices,
    a bare Trainer with a TensorBoardLogger); only the gradient monitoring differs."""
    import warnings
    from collections import OrderedDict

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.utilities import grad_norm
    from torch import nn

    warnings.filterwarnings("ignore")
    from gradwatch.data import TensorBatches

    pl.seed_everything(0, verbose=False)
    kind, device, every = p["kind"], p.get("device", "cpu"), 50
    CLOCK.__init__()
    sizes = p["sizes"]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[tuple[str, nn.Module]] = []
            for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False), 1):
                layers.append((f"fc{i}", nn.Linear(a, b)))
                if i < len(sizes) - 1:
                    layers.append((f"act{i}", nn.ReLU()))
            self.net = nn.Sequential(OrderedDict(layers))

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            # The loss on the steps Lightning writes, as gradwatch's model does.
            if (self.global_step + 1) % every == 0:
                self.log("train/loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
            if kind == "recipe":
                self.log_dict(grad_norm(self, norm_type=2))

        def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: ANN001
            if interleave is not None:
                interleave.step_start(self.trainer)
            CLOCK.batch_start()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            CLOCK.batch_end()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    interleave = Interleaver(**p["interleave"]) if "interleave" in p else None
    x, y = _synthetic(p["samples"], sizes[0], sizes[-1], device)
    callbacks: list[Any] = []
    if kind == "monitor":
        from gradwatch.monitor import GradientMonitor

        callbacks.append(GradientMonitor(**p.get("monitor", {})))
    if p.get("sync_check"):
        callbacks.append(_sync_guard(every))
    with tempfile.TemporaryDirectory() as tmp:
        model = Module()
        if kind == "wandb":
            import wandb

            wandb.init(mode="offline", dir=tmp)
            wandb.watch(model, log="all", log_freq=every)
        trainer = pl.Trainer(
            max_epochs=p["epochs"],
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            logger=pl.loggers.TensorBoardLogger(tmp, name="", version=""),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=every,
            callbacks=callbacks,
            default_root_dir=tmp,
        )
        data = TensorBatches(x, y, batch_size=128, shuffle=True, seed=0)
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=data)
        if device == "cuda":
            torch.cuda.synchronize()
        fit = time.perf_counter() - start
        if kind == "wandb":
            wandb.finish()
    out = {"fit": fit, "loop": CLOCK.seconds, "loop_cpu": CLOCK.cpu_seconds}
    out["monitor_hooks"] = MonitorHookTimer.seconds
    if interleave is not None:
        out["interleaved_pct"] = interleave.overhead_pct(CLOCK.end)
    if p.get("sync_check"):
        out["sync_checked_steps"] = next(
            c for c in callbacks if type(c).__name__ == "SyncGuard"
        ).checked
    return out


RUNNERS = {
    "plain": run_plain,
    "lightning": run_lightning_xor,
    "gradwatch": run_gradwatch,
    "monitored": run_monitored,
}


def contender_main(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["runner"] in ("gradwatch", "monitored"):
        MonitorHookTimer.install()
    result = RUNNERS[spec["runner"]](spec["params"])
    print(MARK + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent side: which contenders, run alternating, medians, ratios, targets.
# ------------------------------------------------------------------------------------------------


def contenders(block: str, quick: bool, notes: list[str]) -> list[dict[str, Any]]:
    """Every contender of `block`: name, label, baseline (a name in the block), runner, params."""
    out: list[dict[str, Any]] = []

    def add(name: str, label: str, runner: str, params: dict[str, Any], base: str) -> None:
        out.append(
            {"block": block, "name": name, "label": label, "runner": runner, "params": params}
        )
        out[-1]["baseline"] = base

    if block == "tutorial":
        epochs = 1000 if quick else 5000
        base = "plain"
        add("plain", "plain PyTorch loop", "plain", {"epochs": epochs}, base)
        add(
            "bare", "Lightning, bare Trainer", "lightning", {"epochs": epochs, "kind": "bare"}, base
        )
        add(
            "default",
            "Lightning, default setup",
            "lightning",
            {"epochs": epochs, "kind": "default"},
            base,
        )
        add(
            "recipe",
            "Lightning default + grad_norm recipe",
            "lightning",
            {"epochs": epochs, "kind": "recipe"},
            base,
        )
        ep = [f"trainer.max_epochs={epochs}"]
        add("gradwatch", "gradwatch defaults", "gradwatch", {"overrides": ep}, base)
        add(
            "gradwatch_nomon",
            "gradwatch, callbacks.gradient_monitor=null",
            "gradwatch",
            {"overrides": ep + ["callbacks.gradient_monitor=null"]},
            base,
        )
        add(
            "gradwatch_hist50",
            "gradwatch, every histogram every 50 steps",
            "gradwatch",
            {"overrides": ep + ["callbacks.gradient_monitor.histogram_every_n_steps=50"]},
            base,
        )
        # The monitor's overhead side by side inside one run (see Interleaver).
        add(
            "gradwatch_ab",
            "gradwatch defaults, monitor in and out by turns of 50 steps",
            "gradwatch",
            {"overrides": ep, "interleave": {"block": 50, "hist_every": 500}},
            base,
        )
        add(
            "gradwatch_hist50_ab",
            "gradwatch, histograms every 50 steps, monitor in and out by turns",
            "gradwatch",
            {
                "overrides": ep + ["callbacks.gradient_monitor.histogram_every_n_steps=50"],
                "interleave": {"block": 50, "hist_every": 50},
            },
            base,
        )
        add(
            "noop_callback_ab",
            "gradwatch defaults + a Callback that does nothing, in and out by turns",
            "gradwatch",
            {"overrides": ep, "interleave": {"block": 50, "hist_every": 0, "noop": True}},
            base,
        )
        return out

    if block == "ablation":
        # Where gradwatch's tutorial run spends beyond a bare Trainer: one piece off at a time.
        epochs = 1000 if quick else 5000
        ep = [f"trainer.max_epochs={epochs}"]
        mon_off = ["callbacks.gradient_monitor=null"]
        add(
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
            add(name, label, "gradwatch", {"overrides": ep + extra}, "bare")
        return out

    device = "cuda" if block == "gpu" else "cpu"
    if block in ("mid", "gpu"):
        mid = {"sizes": [784, 128, 128, 10], "samples": 60_000, "epochs": 1 if quick else 2}
        mid["device"] = device
        add("none", "no monitor", "monitored", {**mid, "kind": "none"}, "none")
        add("monitor", "GradientMonitor defaults", "monitored", {**mid, "kind": "monitor"}, "none")
        add(
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
        add(
            "hist_50",
            "GradientMonitor, all histograms every 50 steps",
            "monitored",
            {**mid, "kind": "monitor", "monitor": {"histogram_every_n_steps": 50}},
            "none",
        )
        add("recipe", "Lightning grad_norm recipe", "monitored", {**mid, "kind": "recipe"}, "none")
        # The monitor's overhead side by side inside one run (see Interleaver): twice the steps,
        # for twice the pairs of blocks.
        ab = {**mid, "epochs": 2 * mid["epochs"], "kind": "monitor"}
        epoch_steps = -(-mid["samples"] // 128)
        add(
            "monitor_ab",
            "GradientMonitor defaults, in and out by turns of 50 steps",
            "monitored",
            {**ab, "interleave": {"block": 50, "hist_every": 500, "epoch_steps": epoch_steps}},
            "none",
        )
        add(
            "hist_50_ab",
            "histograms every 50 steps, in and out by turns",
            "monitored",
            {
                **ab,
                "monitor": {"histogram_every_n_steps": 50},
                "interleave": {"block": 50, "hist_every": 50, "epoch_steps": epoch_steps},
            },
            "none",
        )
        try:
            import importlib.util

            has_wandb = importlib.util.find_spec("wandb") is not None
        except ValueError:
            has_wandb = False
        if has_wandb:
            add(
                "wandb",
                "wandb.watch offline (all, every 50)",
                "monitored",
                {**mid, "kind": "wandb"},
                "none",
            )
        else:
            notes.append(f"{block}: wandb is not installed; the wandb.watch contender is skipped.")
        if block == "gpu":
            add(
                "sync_check",
                "GradientMonitor defaults, sync_debug_mode=error off-cadence",
                "monitored",
                {**mid, "kind": "monitor", "sync_check": True},
                "none",
            )
        return out

    if block == "depth":
        steps = 250 if quick else 500
        for depth in DEPTHS:
            params = {"sizes": [64] + [64] * depth + [10], "samples": 128 * 250, "device": "cpu"}
            params["epochs"] = steps // 250
            add(
                f"none_{depth}",
                f"{depth} layers, no monitor",
                "monitored",
                {**params, "kind": "none"},
                f"none_{depth}",
            )
            add(
                f"monitor_{depth}",
                f"{depth} layers, GradientMonitor defaults",
                "monitored",
                {**params, "kind": "monitor"},
                f"none_{depth}",
            )
        return out
    raise ValueError(
        f"--blocks: unknown block {block!r}; choose from {', '.join(BLOCKS + EXTRA_BLOCKS)}"
    )


def run_one(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """One contender process: its own timings and the whole process's wall time."""
    payload = json.dumps({"runner": spec["runner"], "params": spec["params"], "threads": threads})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "scripts"), env.get("PYTHONPATH")])
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--contender", payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
    result = json.loads(lines[-1][len(MARK) :])
    result["process"] = wall
    return result


def summarize(specs: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> list[dict]:
    rows = []
    med: dict[str, dict[str, float]] = {}
    for s in specs:
        ok = [r for r in runs[s["key"]] if "error" in r]
        good = [r for r in runs[s["key"]] if "error" not in r]
        med[s["key"]] = {
            m: statistics.median(r[m] for r in good) if good else float("nan") for m in METRICS
        }
        row = {k: s[k] for k in ("block", "name", "label", "baseline")}
        row["n"] = len(good)
        row.update({f"{m}_s": v for m, v in med[s["key"]].items()})
        row["all"] = {m: [round(r[m], 4) for r in good] for m in METRICS}
        row["rounds"] = {
            m: [None if "error" in r else r[m] for r in runs[s["key"]]] for m in METRICS
        }
        if ok:
            row["error"] = ok[-1]["error"]
        reported = [r["fit_reported"] for r in good if "fit_reported" in r]
        if reported:  # gradwatch's own fit_seconds (metrics.json), for comparison
            row["fit_reported_s"] = statistics.median(reported)
        ab = [r["interleaved_pct"] for r in good if "interleaved_pct" in r]
        if ab:  # the monitor's overhead from blocks with and without it in the same run
            row["interleaved_pct"] = statistics.median(ab)
        hooks = [100 * r["monitor_hooks"] / r["loop"] for r in good if r.get("monitor_hooks")]
        if hooks:  # the monitor's own hooks, as a share of the same run's loop
            row["monitor_hooks_pct"] = statistics.median(hooks)
        for r in good:
            if "sync_checked_steps" in r:
                row["sync_checked_steps"] = r["sync_checked_steps"]
        rows.append(row)
    for row in rows:
        base = med[f"{row['block']}/{row['baseline']}"]
        for m in METRICS:
            row[f"{m}_x"] = row[f"{m}_s"] / base[m] if base[m] else float("nan")
    return rows


def pct(ratio: float | None) -> float | None:
    return None if ratio is None else 100 * (ratio - 1)


def targets(rows: list[dict[str, Any]], clock: str = "wall") -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when not measurable, the numbers) for every target of the issue.

    clock "wall": the tutorial's fit and the other blocks' loop, in wall time (the issue's
    measure); "cpu": the loop's CPU time instead, for a machine shared with other work."""
    fit_m = "fit_s" if clock == "wall" else "loop_cpu_s"
    loop_m = "loop_s" if clock == "wall" else "loop_cpu_s"
    by = {(r["block"], r["name"]): r for r in rows}
    out: list[tuple[str, bool | None, str]] = []

    def check(name: str, value: float | None, limit: float, op: str, unit: str = "x") -> None:
        if value is None or value != value:
            out.append((name, None, "not measured"))
            return
        ok = value <= limit if op == "<=" else value < limit if op == "<" else value >= limit
        out.append((name, ok, f"{value:.3g}{unit} (target {op} {limit:g}{unit})"))

    def monitor_check(name: str, block: str, runs: tuple[str, str], ab: str, limit: float) -> None:
        """The monitor's overhead in %: from the in-run A/B (`ab`, see Interleaver) when it was
        measured, run against run (`runs`: with, without) otherwise; the other figures follow."""
        with_, without = runs
        by_runs = pct(ratio(block, with_, without, loop_m if block != "tutorial" else fit_m))
        in_run = by.get((block, ab), {}).get("interleaved_pct")
        check(
            f"{name} ({'in-run A/B' if in_run is not None else 'run against run'})",
            by_runs if in_run is None else in_run,
            limit,
            "<",
            "%",
        )
        notes = []
        if in_run is not None and by_runs is not None:
            notes.append(f"run against run {by_runs:+.1f}%")
        hooks = by.get((block, with_), {}).get("monitor_hooks_pct")
        if hooks is not None:
            notes.append(f"the monitor's own hooks {hooks:.2f}% of the loop")
        if notes:
            label, ok, detail = out[-1]
            out[-1] = (label, ok, f"{detail}; {'; '.join(notes)}")

    def ratio(block: str, a: str, b: str, metric: str) -> float | None:
        """The median over rounds of a's time over b's in the same round."""
        ra, rb = by.get((block, a)), by.get((block, b))
        if ra is None or rb is None:
            return None
        m = metric.removesuffix("_s")
        pairs = [x / y for x, y in zip(ra["rounds"][m], rb["rounds"][m], strict=True) if x and y]
        return statistics.median(pairs) if pairs else None

    if any(r["block"] == "tutorial" for r in rows):
        check(
            "tutorial: gradwatch fit / bare Trainer fit",
            ratio("tutorial", "gradwatch", "bare", fit_m),
            1.25,
            "<=",
        )
        check(
            "tutorial: gradwatch fit / plain loop",
            ratio("tutorial", "gradwatch", "plain", fit_m),
            4.5,
            "<=",
        )
        # The monitor's own cost on the tutorial's run (issue 3): gradwatch with and without it.
        monitor_check(
            "tutorial: the monitor at defaults",
            "tutorial",
            ("gradwatch", "gradwatch_nomon"),
            "gradwatch_ab",
            3,
        )
        monitor_check(
            "tutorial: the monitor with every histogram every 50 steps",
            "tutorial",
            ("gradwatch_hist50", "gradwatch_nomon"),
            "gradwatch_hist50_ab",
            15,
        )
        noop = by.get(("tutorial", "noop_callback_ab"), {}).get("interleaved_pct")
        if noop is not None:
            out.append(
                (
                    "tutorial, for scale: Lightning's dispatch of one Callback that does nothing"
                    " (in-run A/B)",
                    None,
                    f"{noop:.3g}%: what a Callback costs on one-step epochs when Lightning"
                    " dispatches every hook (gradwatch's skip the step hooks they do not use)",
                )
            )
        check(
            "tutorial: gradwatch process / plain script",
            ratio("tutorial", "gradwatch", "plain", "process_s"),
            4.0,
            "<=",
        )
    for block in ("mid", "gpu"):
        if not any(r["block"] == block for r in rows):
            continue
        # The monitor's per-step cost: the training steps alone (loop), not the one-off
        # end-of-training summary, which the fit column shows.
        monitor_check(
            f"{block}: the monitor at defaults", block, ("monitor", "none"), "monitor_ab", 3
        )
        monitor_check(
            f"{block}: the monitor with every histogram every 50 steps",
            block,
            ("hist_50", "none"),
            "hist_50_ab",
            15,
        )
        check(
            f"{block}: recipe / monitor defaults (loop)",
            ratio(block, "recipe", "monitor", loop_m),
            2,
            ">=",
        )
        check(
            f"{block}: recipe / histograms every 50 (loop)",
            ratio(block, "recipe", "hist_50", loop_m),
            2,
            ">=",
        )
        if block == "gpu":
            row = by.get(("gpu", "sync_check"))
            if row is not None:
                ok = row.get("n", 0) > 0 and "error" not in row
                detail = (
                    f"{row.get('sync_checked_steps', 0)} steps checked"
                    if ok
                    else row.get("error", "")
                )
                out.append(("gpu: no host sync on steps that write nothing", ok, detail))
    if any(r["block"] == "depth" for r in rows):

        def over(d: int) -> float | None:
            r = ratio("depth", f"monitor_{d}", f"none_{d}", loop_m)
            return None if r is None else r - 1

        lo, hi = over(DEPTHS[0]), over(DEPTHS[-1])
        detail = (
            None
            if lo is None or hi is None
            else (hi / lo if lo > 0 else (0.0 if hi <= 0 else float("inf")))
        )
        # A negative or zero overhead at 3 layers (noise) makes the ratio meaningless: show both.
        check(f"depth: overhead at {DEPTHS[-1]} layers / at {DEPTHS[0]} layers", detail, 1.5, "<=")
        if lo is not None and hi is not None:
            out[-1] = (
                out[-1][0],
                out[-1][1],
                out[-1][2] + f"; overheads {100 * lo:+.1f}% and {100 * hi:+.1f}%",
            )
    return out


def markdown(rows: list[dict[str, Any]], checks: list, meta: dict[str, Any]) -> str:
    lines = [
        f"Machine: {meta['machine']}",
        f"Command: `{meta['command']}`",
        f"Repeats: {meta['repeats']} (medians; targets: medians of per-round ratios),"
        f" torch threads: {meta['threads']},"
        f" targets on {meta['clock']} time, {meta['date']}",
        "",
    ]
    for block in dict.fromkeys(r["block"] for r in rows):
        lines += [
            f"### {block}",
            "",
            "| contender | fit s | x | loop s | x | loop CPU s | x | process s | x"
            " | monitor hooks, % of loop |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r["block"] == block):
            cells = [f"{r[f'{m}_s']:.3f} | {r[f'{m}_x']:.2f}" for m in METRICS]
            hooks = r.get("monitor_hooks_pct")
            cells.append("-" if hooks is None else f"{hooks:.2f}")
            note = " (failed)" if r["n"] == 0 else ""
            lines.append(f"| {r['label']}{note} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### targets", ""]
    for name, ok, detail in checks:
        verdict = "PASS" if ok else "FAIL" if ok is False else "N/A"
        if ok is None and detail != "not measured":
            verdict = "info"  # a figure for scale, not a target
        lines.append(f"- {verdict}: {name}: {detail}")
    for note in meta["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    code = "import torch, lightning; print(torch.__version__, lightning.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    versions = out.stdout.split()
    torch_v, lightning_v = (versions + ["?", "?"])[:2]
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch_v},"
        f" lightning {lightning_v}, {platform.system()} {platform.release()}"
    )


def cuda_available() -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return out.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--blocks",
        default=",".join(BLOCKS),
        help="comma-separated: " + ", ".join(BLOCKS + EXTRA_BLOCKS),
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per contender (default 7; 2 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and epochs: a smoke test"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every contender")
    parser.add_argument(
        "--only", default="", help="comma-separated contender names to keep (baselines always kept)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "bench",
        help="where the JSON and Markdown go",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per contender process")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="targets from wall time (default) or the loop's CPU time (a busy, shared machine)",
    )
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        contender_main(json.loads(args.contender))
        return

    repeats = args.repeats or (2 if args.quick else 7)
    notes: list[str] = []
    if args.quick:
        notes.append("--quick: shorter runs and fewer repeats; a smoke test, not a result.")
    specs: list[dict[str, Any]] = []
    for block in [b.strip() for b in args.blocks.split(",") if b.strip()]:
        if block == "gpu" and not cuda_available():
            notes.append("gpu: skipped, torch.cuda.is_available() is False on this machine.")
            print("gpu block skipped: no CUDA device (torch.cuda.is_available() is False)")
            continue
        specs += contenders(block, args.quick, notes)
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s["name"] in keep or s["name"] == s["baseline"]]
    for s in specs:
        s["key"] = f"{s['block']}/{s['name']}"
    runs: dict[str, list[dict[str, Any]]] = {s["key"]: [] for s in specs}

    for block in dict.fromkeys(s["block"] for s in specs):
        in_block = [s for s in specs if s["block"] == block]
        for rep in range(repeats):
            # ABC CBA ABC...: load drifts hit every contender alike, and none always runs first.
            for s in in_block if rep % 2 == 0 else in_block[::-1]:
                r = run_one(s, args.threads, args.timeout)
                runs[s["key"]].append(r)
                shown = (
                    r["error"].splitlines()[-1]
                    if "error" in r
                    else f"fit {r['fit']:.3f}s loop {r['loop']:.3f}s cpu {r['loop_cpu']:.3f}s"
                    f" process {r['process']:.3f}s"
                )
                print(f"[{block} {rep + 1}/{repeats}] {s['name']:<18} {shown}", flush=True)

    rows = summarize(specs, runs)
    checks = targets(rows, args.clock)
    meta = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, "scripts/bench.py", *sys.argv[1:]]),
        "repeats": repeats,
        "threads": args.threads,
        "clock": args.clock,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "notes": notes,
    }
    text = markdown(rows, checks, meta)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_results.md").write_text(text)
    payload = {"meta": meta, "rows": rows, "targets": [list(c) for c in checks]}
    (args.out / "bench_results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_results.md'} and {args.out / 'bench_results.json'}")


if __name__ == "__main__":
    main()
