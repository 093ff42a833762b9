"""The mid, depth and gpu blocks' contender: one minimal LightningModule, an MLP on in-memory
synthetic data, with or without gradient monitoring (gradwatch's, Lightning's recipe, wandb)."""

import tempfile
import time
from typing import Any

from bench_parts.contender.activations_ab import ActivationInterleaver, interleaver
from bench_parts.contender.clocks import CLOCK, MonitorHookTimer


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

    interleave = interleaver(p["interleave"]) if "interleave" in p else None
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
