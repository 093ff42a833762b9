"""What each gradient tool records against the true gradient, where training does more than one
plain backward per step: gradient accumulation, bf16 autocast, fp16 with a loss scaler.

    .venv/bin/python scripts/bench_truth.py            # prints a Markdown table
    (make bench prints it with the wandb block)

One training step of an MLP (64-32-32-10, ReLU, cross-entropy, SGD) in one Lightning Trainer that
carries every tool at once, so that all of them see the same step: gradwatch's GradientMonitor
(its `grad_norm/...` scalars and `grad_hist/...` histograms, read back from its TensorBoard
event file), Lightning's `grad_norm` recipe (the dict it would log) and, where wandb is installed,
`wandb.watch(log="gradients")` (the tensors its histograms are drawn from, taken as its gradient
hooks hand them over). The true gradient: plain PyTorch in float32, the mean loss over the step's
whole batch (all accumulated micro-batches), from the same initial weights.

Each cell is the worst parameter's relative error of the L2 norm the tool records (for a
histogram, the norm of the values it was drawn from), and for histograms the share of values in a
bin other than the true gradient's histogram over the same range puts them. "the training's own"
is plain PyTorch's gradient at the case's precision (autocast, unscaled), drawn as 64 bins over its
range: what the optimizer steps with, and the best a tool that reads it can do.

Cases: `accumulate_grad_batches=4` (fp32); `bf16-mixed` (CPU autocast, no scaler);
`16-mixed` with a GradScaler (initial scale 2**16: what CUDA's AMP does; here on CPU).
"""

import argparse
import sys
import tempfile
import warnings
from typing import Any

SIZES = (64, 32, 32, 10)
MICRO, ACCUMULATE = 32, 4
SCALE = 2.0**16


def make_data() -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(MICRO * ACCUMULATE, SIZES[0], generator=gen)
    y = torch.randint(0, SIZES[-1], (MICRO * ACCUMULATE,), generator=gen)
    return x, y


def make_net() -> Any:
    from collections import OrderedDict

    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:], strict=False), 1):
        layers.append((f"fc{i}", nn.Linear(a, b)))
        if i < len(SIZES) - 1:
            layers.append((f"act{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def plain_gradients(autocast: Any = None) -> dict[str, Any]:
    """Plain PyTorch: the mean loss over the whole batch, float32 unless `autocast` (a dtype) is
    given; the step's gradient as the optimizer would see it (unscaled)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    net = make_net()
    x, y = make_data()
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        loss = F.cross_entropy(net(x), y)
    loss.float().backward()
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}


def lightning_step(case: str, with_wandb: bool, tmp: str) -> dict[str, dict[str, Any]]:
    """One optimizer step in Lightning with every tool on; what each recorded, by parameter."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.utilities import grad_norm

    from gradwatch.monitor import GradientMonitor

    recipe: dict[str, float] = {}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
            # Lightning's recipe: the dict `self.log_dict` would log, kept as it is.
            recipe.update({k: float(v) for k, v in grad_norm(self, norm_type=2).items()})

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    accumulate = ACCUMULATE if case == "accumulate" else 1
    micro = MICRO if case == "accumulate" else MICRO * ACCUMULATE
    x, y = make_data()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro)
    loggers: list[Any] = [pl.loggers.TensorBoardLogger(tmp, name="tb", version="")]
    wandb_seen: dict[str, Any] = {}
    model = Module()
    if with_wandb:
        from lightning.pytorch.loggers import WandbLogger
        from wandb.integration.torch.wandb_torch import TorchHistory

        # What wandb.watch histograms: the tensor its gradient hook hands to log_tensor_stats.
        log_tensor_stats = TorchHistory.log_tensor_stats

        def seen(self: Any, tensor: Any, name: str) -> None:
            # "gradients/graph_0net.fc1.weight": wandb's prefix for the watched model, then ours.
            wandb_seen[name.split("net.", 1)[1]] = tensor.detach().clone()
            log_tensor_stats(self, tensor, name)

        TorchHistory.log_tensor_stats = seen
        logger = WandbLogger(save_dir=tmp, offline=True, project="gradwatch-truth")
        loggers.append(logger)
        # Its hooks count backward passes: log_freq = the micro-batches of one step, so that it
        # logs within the step (at its last micro-batch), as it does every log_freq passes.
        logger.watch(model, log="gradients", log_freq=accumulate)
    precision: Any = "32-true"
    plugins: list[Any] = []
    if case == "bf16":
        precision = "bf16-mixed"
    elif case == "fp16":
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        precision = None
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        precision=precision,
        plugins=plugins,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=1,
        callbacks=[
            GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=1, histogram_min_values=1)
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    trainer.fit(model, train_dataloaders=data)
    if with_wandb:
        import wandb

        wandb.finish()
        TorchHistory.log_tensor_stats = log_tensor_stats
    return {
        "gradwatch": read_gradwatch(f"{tmp}/tb"),
        "recipe": {
            name.removeprefix("grad_2.0_norm/").removeprefix("net."): value
            for name, value in recipe.items()
            if name != "grad_2.0_norm_total"
        },
        "wandb": wandb_seen,
    }


def read_gradwatch(log_dir: str) -> dict[str, Any]:
    """gradwatch's records of step 0, from its event file: {param: (norm, histogram)}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    norms = {t.removeprefix("grad_norm/"): acc.Scalars(t)[0].value for t in acc.Tags()["scalars"]}
    hists = {
        t.removeprefix("grad_hist/"): acc.Histograms(t)[0].histogram_value
        for t in acc.Tags()["histograms"]
        if t.startswith("grad_hist/")
    }
    return {name: (norms.get(name), h) for name, h in hists.items()}


def misplaced(true: Any, lo: float, hi: float, counts: list[float]) -> float:
    """The share of values in another bin than the true gradient's histogram over [lo, hi]
    (half the L1 distance of the two histograms, over the number of values)."""
    import torch

    n = true.numel()
    # A true value just past the recorded range (the last bits of float32 arithmetic in another
    # order) belongs to the edge bin, not outside every bin.
    values = true.double().clamp(lo, hi)
    if hi <= lo:
        expected = [float(n)]
    else:
        expected = torch.histc(values, bins=len(counts), min=lo, max=hi).tolist()
    return sum(abs(a - b) for a, b in zip(counts, expected, strict=True)) / (2 * n)


def errors(true: dict[str, Any], got: dict[str, Any]) -> dict[str, str]:
    """Each tool's worst parameter: relative norm error (and misplaced share for histograms)."""

    def rel(a: float, b: float) -> float:
        return abs(a - b) / b

    out: dict[str, str] = {}
    norm_err, hist_err = [], []
    for name, (norm, h) in got["gradwatch"].items():
        t = true[name]
        norm_err.append(rel(norm, float(t.norm())))
        counts = list(h.bucket)[1:]  # the first bucket is the empty one at the minimum
        hist_err.append(misplaced(t, h.min, h.max, counts))
    out["gradwatch norms"] = f"{max(norm_err):.1e}"
    out["gradwatch histograms"] = f"{100 * max(hist_err):.1f}% misplaced"
    out["Lightning grad_norm recipe"] = (
        f"{max(rel(v, float(true[k].norm())) for k, v in got['recipe'].items()):.1e}"
    )
    if got["wandb"]:
        out["wandb.watch histograms"] = drawn_from(true, got["wandb"])
    return out


def drawn_from(true: dict[str, Any], tensors: dict[str, Any]) -> str:
    """A histogram of 64 bins over each tensor's own range (as wandb.watch draws them): the worst
    parameter's norm error of the tensor, and its share of misplaced values."""
    import torch

    norm_err, hist_err = [], []
    for name, seen in tensors.items():
        t = true[name]
        norm_err.append(abs(float(seen.float().norm()) - float(t.norm())) / float(t.norm()))
        flat = seen.float().reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        counts = torch.histc(flat, bins=64, min=lo, max=hi).tolist() if hi > lo else [1.0]
        hist_err.append(misplaced(t, lo, hi, counts))
    return f"{max(norm_err):.1e}, {100 * max(hist_err):.1f}% misplaced"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    import importlib.util
    import logging
    import os

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    with_wandb = importlib.util.find_spec("wandb") is not None
    true = plain_gradients()
    cases = {
        "accumulate": ("`accumulate_grad_batches=4`, fp32", None),
        "bf16": ("`bf16-mixed` (CPU autocast)", torch.bfloat16),
        "fp16": ("`16-mixed` + GradScaler(2**16), CPU", torch.float16),
    }
    columns = ["gradwatch norms", "gradwatch histograms", "Lightning grad_norm recipe"]
    if with_wandb:
        columns.append("wandb.watch histograms")
    lines = [
        "| case | the training's own | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for case, (label, dtype) in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            got = lightning_step(case, with_wandb, tmp)
        cells = errors(true, got)
        own = drawn_from(true, plain_gradients(dtype) if dtype else true)
        lines.append(f"| {label} | {own} | " + " | ".join(cells[c] for c in columns) + " |")
    print("\n".join(lines))
    if not with_wandb:
        print("\n(wandb is not installed: its column is left out.)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
