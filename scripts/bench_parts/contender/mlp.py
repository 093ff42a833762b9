"""The mid, depth, gpu and wandb blocks' contender: one minimal LightningModule, an MLP on
in-memory synthetic data (or the tutorial's XOR), with or without gradient monitoring
(gradwatch's, Lightning's recipe, wandb.watch), logging to TensorBoard or to wandb (offline)."""

import tempfile
import time
from typing import Any

from bench_parts.contender.activations_ab import ActivationInterleaver, interleaver
from bench_parts.contender.clocks import CLOCK, MonitorHookTimer
from bench_parts.contender.steps import CPU, STEPS, logging_excess


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


def _xor(device: str) -> tuple[Any, Any]:
    import torch

    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    return x.to(device), y.to(device)


def _wandb_logger(tmp: str) -> Any:
    """Lightning's WandbLogger, offline (nothing leaves the machine), its run started now, before
    the loop: wandb's service process and its set-up are not the loop's."""
    import os

    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=tmp, offline=True, project="gradwatch-bench")
    logger.experiment  # noqa: B018 (starts the run)
    return logger


def run_monitored(p: dict[str, Any]) -> dict[str, float]:
    """The mid, depth, gpu and wandb blocks: one minimal LightningModule (an MLP on in-memory
    slices, a bare Trainer with a TensorBoardLogger, or a WandbLogger with `"logger": "wandb"`);
    only the gradient monitoring differs. `"task": "xor"`: the tutorial's network and data (2-2-1,
    sigmoid, MSE, the four rows as one batch: one-step epochs). `"steps": true`: every step's
    times and every process's CPU time (`bench_parts.contender.steps`). `"fast_crc": true`:
    TensorBoard's checksums in C, as gradwatch's command line has them."""
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
    xor = p.get("task") == "xor"
    sizes = [2, 2, 1] if xor else p["sizes"]
    act, loss_fn = (nn.Sigmoid, F.mse_loss) if xor else (nn.ReLU, F.cross_entropy)
    record_steps = p.get("steps", False)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[tuple[str, nn.Module]] = []
            for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False), 1):
                layers.append((f"fc{i}", nn.Linear(a, b)))
                if i < len(sizes) - 1:
                    layers.append((f"act{i}", act()))
            self.net = nn.Sequential(OrderedDict(layers))

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            loss = loss_fn(self.net(x), y)
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
            if record_steps:
                if not STEPS.marks:
                    CPU.mark_start()
                STEPS.mark()
            CLOCK.batch_start()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            CLOCK.batch_end()
            if record_steps:
                STEPS.mark_end()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    if p.get("fast_crc"):
        # TensorBoard's record checksums in C, as gradwatch's command line writes them
        # (gradwatch.overhead): the same bytes; the library leaves TensorBoard's own Python ones.
        from gradwatch.overhead import use_fast_crc32c

        assert use_fast_crc32c(), "google-crc32c's C extension is missing"
    interleave = interleaver(p["interleave"]) if "interleave" in p else None
    x, y = _xor(device) if xor else _synthetic(p["samples"], sizes[0], sizes[-1], device)
    callbacks: list[Any] = []
    if kind == "monitor":
        from gradwatch.monitor import GradientMonitor

        callbacks.append(GradientMonitor(**p.get("monitor", {})))
    if p.get("sync_check"):
        callbacks.append(_sync_guard(every))
    with tempfile.TemporaryDirectory() as tmp:
        model = Module()
        if p.get("logger") == "wandb":
            logger: Any = _wandb_logger(tmp)
        else:
            logger = pl.loggers.TensorBoardLogger(tmp, name="", version="")
        if kind == "wandb":
            # Through the logger, as Lightning's docs show: `wandb.watch` on the logger's run.
            logger.watch(model, log="all", log_freq=every)
        trainer = pl.Trainer(
            max_epochs=p["epochs"],
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=every,
            callbacks=callbacks,
            default_root_dir=tmp,
        )
        data = TensorBatches(x, y, batch_size=4 if xor else 128, shuffle=not xor, seed=0)
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=data)
        if device == "cuda":
            torch.cuda.synchronize()
        fit = time.perf_counter() - start
        if p.get("logger") == "wandb":
            # The run's end: what wandb still has to write lands here, counted in the run's CPU
            # (TensorBoard's writer is flushed and closed inside fit, by the logger's finalize).
            logger.experiment.finish()
        if record_steps:
            run_cpu = CPU.since_start()
    out = {"fit": fit, "loop": CLOCK.seconds, "loop_cpu": CLOCK.cpu_seconds}
    if record_steps:
        out.update(run_cpu)
        out["steps"] = len(STEPS.marks)
        for clock, times in STEPS.durations().items():
            out[f"steps_{clock}"] = logging_excess(times, every)
    out["monitor_hooks"] = MonitorHookTimer.seconds
    if interleave is not None:
        out["interleaved_pct"] = interleave.overhead_pct(CLOCK.end)
    if isinstance(interleave, ActivationInterleaver):
        out["extra"] = {
            "probe_pct": interleave.probe_pct(CLOCK.end),
            **interleave.estimates(CLOCK.end, CLOCK.cpu_end),
        }
    if p.get("sync_check"):
        out["sync_checked_steps"] = next(
            c for c in callbacks if type(c).__name__ == "SyncGuard"
        ).checked
    return out
