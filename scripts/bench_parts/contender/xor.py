"""The tutorial's XOR contenders: the plain PyTorch loop as a user would write it, XOR in
Lightning (bare, default, with the grad_norm recipe), and gradwatch's own entry, `train(cfg)`.
Each runs in its own process and returns its timings."""

import tempfile
import time
from typing import Any

from bench_parts import CONF_DIR
from bench_parts.contender.clocks import CLOCK, Interleaver, MonitorHookTimer


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
