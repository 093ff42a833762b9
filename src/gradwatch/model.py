"""The network (a plain nn.Module MLP) and the LightningModule that trains it with its loss."""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}
LOSSES = ("mse", "bce_with_logits", "cross_entropy")


class MLP(nn.Module):
    """Linear layers `fc1`, `fc2`, ... between `layer_sizes`, the activation after each but the
    last, so gradients read like the tutorial's `fc1.weight.grad`."""

    def __init__(self, layer_sizes: list[int], activation: str = "sigmoid") -> None:
        super().__init__()
        # The network's own checks, the only ones: a config is checked before training by
        # building its model. (bool is an int subclass: YAML `true` is not a size.)
        if (
            isinstance(layer_sizes, str | bytes)
            or not isinstance(layer_sizes, Sequence)
            or len(layer_sizes) < 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in layer_sizes)
            or any(n < 1 for n in layer_sizes)
        ):
            shown = list(layer_sizes) if isinstance(layer_sizes, Sequence) else layer_sizes
            raise ValueError(
                "model.layer_sizes must be a list of at least two integers >= 1, e.g. [2,2,1], "
                f"got {shown!r}"
            )
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {list(ACTIVATIONS)}, got {activation!r}"
            )
        self.activation = ACTIVATIONS[activation]
        self.num_layers = len(layer_sizes) - 1
        for i, (n_in, n_out) in enumerate(zip(layer_sizes, layer_sizes[1:], strict=False), 1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
        # A plain tuple, not registered again: walking children() every step costs.
        self.layers = tuple(self.children())

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class MLPModule(pl.LightningModule):
    """The MLP, its loss and its optimizer: logs `train/loss` (and `train/acc` for
    classification), `val/loss` and `val/acc` where the data has a held-out split.

    Args:
        layer_sizes: input, hidden..., output sizes; `[2, 2, 1]` is the tutorial's network.
        activation: hidden activation, one of `ACTIVATIONS`.
        loss: one of `LOSSES`. With mse or bce_with_logits on class targets the network has one
            output and targets become 0./1.; cross_entropy takes one output per class.
        optimizer: a Hydra config of a partial optimizer (`_target_`, `_partial_: true`, lr...).
            Kept as a plain dict, never as the partial itself, so checkpoints load with torch's
            safe loading (`weights_only=True`) and resume.
    """

    def __init__(
        self,
        layer_sizes: list[int] = (2, 2, 1),
        activation: str = "sigmoid",
        loss: str = "mse",
        optimizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, str) or loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {list(LOSSES)}, got {loss!r}")
        # The network checks its sizes and activation (raising ValueError), before they are kept.
        net = MLP(layer_sizes, activation)
        layer_sizes = list(layer_sizes)
        optimizer = optimizer or {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01}
        # Hydra hands over DictConfig/ListConfig; checkpoints must hold plain dicts and lists.
        optimizer = OmegaConf.to_container(OmegaConf.create(optimizer), resolve=True)
        self.save_hyperparameters(
            {
                "layer_sizes": layer_sizes,
                "activation": activation,
                "loss": loss,
                "optimizer": optimizer,
            }
        )
        self.net = net
        self.loss_name = loss
        self._target_cache: tuple[Tensor, Tensor] | None = None
        self._log_every_step = False  # see on_train_start
        self._sharded = False  # see configure_model

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _target(self, y: Tensor) -> Tensor:
        # Class indices feed cross_entropy as they are; mse and bce compare one output to 0./1.
        if y.dtype != torch.long or self.loss_name == "cross_entropy":
            return y
        # A full-batch run passes the same tensor every step: convert it once.
        if self._target_cache is None or self._target_cache[0] is not y:
            self._target_cache = (y, y.to(torch.float32).unsqueeze(1))
        return self._target_cache[1]

    def compute_loss(self, out: Tensor, y: Tensor) -> Tensor:
        target = self._target(y)
        if self.loss_name == "mse":
            return F.mse_loss(out, target)
        if self.loss_name == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(out, target)
        return F.cross_entropy(out, target)

    def accuracy(self, out: Tensor, y: Tensor) -> Tensor:
        """Share of points classified right (class targets only)."""
        if self.loss_name == "cross_entropy":
            predicted = out.argmax(dim=1)
        else:
            # mse regresses 0./1. (decide at 0.5); bce's output is a logit (decide at 0).
            threshold = 0.5 if self.loss_name == "mse" else 0.0
            predicted = (out.squeeze(1) > threshold).long()
        return (predicted == y).to(torch.float32).mean()

    def on_train_start(self) -> None:
        # Lightning's `self.log` walks the logged metric's state on every call (a tenth of a
        # millisecond or more, a step of the tutorial's network): the training metrics go through
        # it on the steps Lightning writes, and on every step only when a callback monitors one
        # (EarlyStopping, ModelCheckpoint and the like read `trainer.callback_metrics` whenever
        # they check).
        monitored = [getattr(c, "monitor", None) for c in self.trainer.callbacks]
        self._log_every_step = any(isinstance(m, str) and m.startswith("train/") for m in monitored)

    def _writes_this_step(self) -> bool:
        # The steps where Lightning writes logged values: (step + 1) % log_every_n_steps == 0.
        every = self.trainer.log_every_n_steps
        return self._log_every_step or (
            every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.net(x)
        loss = self.compute_loss(out, y)
        if self._writes_this_step():
            self.log_train_metrics(loss, out, y)
        return loss

    def log_train_metrics(self, loss: Tensor, out: Tensor, y: Tensor) -> None:
        """`train/loss` (and `train/acc`) through `self.log`: to every logger on Lightning's
        cadence, and into `trainer.callback_metrics`. Under data parallelism, the mean over the
        processes' shares."""
        self.log("train/loss", loss, batch_size=len(y), sync_dist=True)
        if y.dtype == torch.long:
            self.log("train/acc", self.accuracy(out, y), batch_size=len(y), sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self.net(x)
        self.log("val/loss", self.compute_loss(out, y), on_epoch=True, sync_dist=True)
        if y.dtype == torch.long:
            self.log("val/acc", self.accuracy(out, y), on_epoch=True, sync_dist=True)

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees gradients before validating; keep them: after training, the last
        # step's gradients are what the tutorial reads (fc1.weight.grad), and they are small.
        pass

    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy (`trainer=fsdp`): FSDP2's `fully_shard` on
        each Linear layer, then on the network, so that every parameter is sharded over the
        processes and each layer's weights are gathered only while it computes. Lightning calls
        this under every strategy, before the optimizer is built, and `load_from_checkpoint`
        without a Trainer; the others need nothing."""
        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        if self._sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self._sharded = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return instantiate(self.hparams.optimizer)(self.parameters())
