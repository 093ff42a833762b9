"""The zoo's networks and the LightningModules that train them, healthy or broken on purpose.

Three families, small enough for a few seconds on a CPU: the MLP (``gradwatch.model.MLP``, layers
``fc1``, ``fc2``, ...), a small CNN on 8x8 images and a small transformer over token sequences.
"""

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradwatch.model import MLP


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, global average pooling and a linear head: 1x8x8 -> classes."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


class SmallTransformer(nn.Module):
    """Token and position embeddings, one encoder layer (ReLU feed-forward, no dropout), mean
    pooling and a linear head: token ids -> classes."""

    def __init__(self, vocab: int = 16, length: int = 8, width: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.encoder = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, classes)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.encoder(x).mean(dim=1))


class BranchedMLP(nn.Module):
    """An MLP with a side branch whose output is detached before it joins, and a module the
    forward never calls: neither ever gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 16)
        self.branch = nn.Linear(2, 16)
        self.unused = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x) + self.branch(x).detach()))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bce": lambda out, y: F.binary_cross_entropy_with_logits(out.squeeze(1), y.float()),
    "ce": F.cross_entropy,
    "mse": lambda out, y: F.mse_loss(out.squeeze(1), y.float()),
    # The same as bce, written by hand and in the unsafe way: log(sigmoid) is log(0) once a logit
    # is large enough for the sigmoid to round to 0 or 1.
    "bce_by_hand": lambda out, y: (
        -(
            y * torch.log(torch.sigmoid(out.squeeze(1)))
            + (1 - y) * torch.log(1 - torch.sigmoid(out.squeeze(1)))
        ).mean()
    ),
    # Summed over the batch instead of averaged: every gradient is batch-size times larger.
    "bce_summed": lambda out, y: F.binary_cross_entropy_with_logits(
        out.squeeze(1), y.float(), reduction="sum"
    ),
}


class ZooModule(pl.LightningModule):
    """Trains ``net`` with ``loss`` and an optimizer over ``params(net)`` (all of them unless a
    case forgets some). ``zero_grad=False`` switches to manual optimization without ever zeroing
    the gradients."""

    def __init__(
        self,
        net: nn.Module,
        loss: str,
        optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
        params: Callable[[nn.Module], Iterator[nn.Parameter]] | None = None,
        zero_grad: bool = True,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = LOSSES[loss]
        self.make_optimizer = optimizer
        self.params = params or (lambda n: n.parameters())
        self.automatic_optimization = zero_grad

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        if not self.automatic_optimization:
            # The bug: backward and step, never zero_grad, so gradients add up step after step.
            opt = self.optimizers()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.params(self.net))


def mlp(sizes: list[int], activation: str) -> MLP:
    return MLP(sizes, activation)
