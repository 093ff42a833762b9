"""In-memory datasets and the LightningDataModule that serves them as tensor slices.

The tutorial's XOR set is four points trained as one full batch for 5000 one-step epochs, so
anything a batch costs beyond the math shows. Batches here are slices of tensors that already
sit on the training device: no Dataset, no per-sample collation, no host-to-device copy per step.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

DATASETS = ("xor", "moons", "circles", "spiral", "sine")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset asks of the network: input width, classes (0 = regression)."""

    num_inputs: int
    num_classes: int

    @property
    def is_regression(self) -> bool:
        return self.num_classes == 0


DATASET_INFO = {
    "xor": DatasetInfo(num_inputs=2, num_classes=2),
    "moons": DatasetInfo(num_inputs=2, num_classes=2),
    "circles": DatasetInfo(num_inputs=2, num_classes=2),
    "spiral": DatasetInfo(num_inputs=2, num_classes=3),
    "sine": DatasetInfo(num_inputs=1, num_classes=0),
}


def make_dataset(name: str, n_samples: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """Features (float32, N x inputs) and targets: class indices (int64, N) for classification,
    values (float32, N x 1) for regression. Generated with torch from `seed` alone."""
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {list(DATASETS)}, got {name!r}")
    if name == "xor":
        # The tutorial's points, in its order; noise and n_samples do not apply.
        x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        return x, torch.tensor([0, 1, 1, 0])
    gen = torch.Generator().manual_seed(seed)
    if name == "moons":
        half = n_samples // 2
        t_out = torch.rand(half, generator=gen) * math.pi
        t_in = torch.rand(n_samples - half, generator=gen) * math.pi
        outer = torch.stack([torch.cos(t_out), torch.sin(t_out)], dim=1)
        inner = torch.stack([1 - torch.cos(t_in), 0.5 - torch.sin(t_in)], dim=1)
        x = torch.cat([outer, inner])
        y = torch.cat([torch.zeros(half), torch.ones(n_samples - half)]).long()
    elif name == "circles":
        half = n_samples // 2
        angle = torch.rand(n_samples, generator=gen) * 2 * math.pi
        radius = torch.cat([torch.ones(half), torch.full((n_samples - half,), 0.5)])
        x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * radius[:, None]
        y = torch.cat([torch.zeros(half), torch.ones(n_samples - half)]).long()
    elif name == "spiral":
        classes = DATASET_INFO["spiral"].num_classes
        y = torch.arange(n_samples) % classes
        r = torch.rand(n_samples, generator=gen)
        angle = y * (2 * math.pi / classes) + r * 4.0
        x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * r[:, None]
    else:  # sine
        x = (torch.rand(n_samples, 1, generator=gen) * 2 - 1) * math.pi
        y = torch.sin(x)
        return x, y + noise * torch.randn(y.shape, generator=gen)
    return x + noise * torch.randn(x.shape, generator=gen), y


class TensorBatches:
    """Batches as slices of in-memory tensors: shuffled each epoch when there is more than one.

    Under data parallelism each process takes every `world_size`-th row of each batch, so the
    processes together see exactly the batch a single process would.

    Resumable (Lightning's stateful-iterable protocol, `state_dict` / `load_state_dict`): the
    state is where the data order stands, so a resumed run takes the batches an uninterrupted run
    would have, mid-epoch included. Every process holds the same state (same seed, same order).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int | None,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size or len(x)
        self.shuffle = shuffle and self.batch_size < len(x)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        # Asked every epoch: worked out once.
        self._len = math.ceil(len(x) / self.batch_size)
        self._one_batch = self.batch_size >= len(x) and world_size == 1
        # The current epoch: the generator before it drew the epoch's order, the batches taken.
        self._epoch_start = self.generator.get_state()
        self._taken = 0
        self._skip = 0  # batches of the next epoch already taken before a resume

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._one_batch:
            # The tutorial's case: one full batch, the very same tensors every epoch. Nothing to
            # resume: there is no order and no position within the epoch.
            yield self.x, self.y
            return
        x, y = self.x, self.y
        if self.shuffle:
            self._epoch_start = self.generator.get_state()
            order = torch.randperm(len(x), generator=self.generator).to(x.device)
            x, y = x[order], y[order]
        self._taken, self._skip = self._skip, 0
        for start in range(self._taken * self.batch_size, len(x), self.batch_size):
            rows = slice(start + self.rank, start + self.batch_size, self.world_size)
            # Counted before the batch is handed over: Lightning asks for the state after the
            # step (it fetches no batch ahead of a loader with a length).
            self._taken += 1
            yield x[rows], y[rows]

    def state_dict(self) -> dict[str, Any]:
        """Where the data order stands: the generator to draw the epoch's order from, and how
        many of that epoch's batches were taken."""
        if self._skip:  # loaded, not iterated since: as loaded
            return {"generator": self.generator.get_state(), "taken": self._skip}
        if 0 < self._taken < self._len:
            # Mid-epoch: the order is drawn again from the epoch's start, the batches taken skipped.
            return {"generator": self._epoch_start, "taken": self._taken}
        # Between epochs (or before the first batch of one): the next order is the generator's.
        return {"generator": self.generator.get_state(), "taken": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (:meth:`state_dict`) at the next `iter()`."""
        self.generator.set_state(state["generator"])
        self._skip = state["taken"]


def _is_int(value: object) -> bool:
    # YAML `true` is a bool, and bool is an int subclass: not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_arguments(
    name: object,
    batch_size: object,
    n_samples: object,
    noise: object,
    val_fraction: object,
    seed: object,
) -> None:
    """Raise ValueError, naming the `data.*` key and what it allows, for an argument of
    :class:`InMemoryDataModule` that cannot run. The datamodule's own check, the only one: a
    config is checked before training by building its datamodule."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"data.name must be one of {list(DATASETS)}, got {name!r}")
    if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
        raise ValueError(
            f"data.batch_size must be an integer >= 1 or null (the whole training set in one "
            f"batch), got {batch_size!r}"
        )
    if not (_is_int(n_samples) and n_samples >= 1):
        raise ValueError(f"data.n_samples must be an integer >= 1, got {n_samples!r}")
    if not (_is_number(noise) and noise >= 0):
        raise ValueError(f"data.noise must be a number >= 0, got {noise!r}")
    if not (_is_number(val_fraction) and 0 <= val_fraction < 1):
        raise ValueError(f"data.val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not _is_int(seed):
        raise ValueError(f"data.seed must be an integer, got {seed!r}")


class InMemoryDataModule(pl.LightningDataModule):
    """One of `DATASETS`, generated from `seed`, split into train and val, served as slices.

    Args:
        name: which dataset (xor is the tutorial's four points).
        batch_size: rows per batch; None means the whole training set in one batch.
        n_samples: how many points to generate (xor always has its four).
        noise: standard deviation of Gaussian noise on the features (targets for sine).
        val_fraction: share of the points held out for validation (xor has none).
        seed: seeds generation and shuffling.

    Raises:
        ValueError: if an argument cannot run (:func:`check_arguments`; the message names the
            `data.*` key and what it allows). Building one writes nothing: the data are
            generated in memory.
    """

    def __init__(
        self,
        name: str = "xor",
        batch_size: int | None = None,
        n_samples: int = 4,
        noise: float = 0.0,
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_arguments(name, batch_size, n_samples, noise, val_fraction, seed)
        self.name, self.batch_size, self.seed = name, batch_size, seed
        self.info = DATASET_INFO[name]
        x, y = make_dataset(name, n_samples, noise, seed)
        n_val = 0 if name == "xor" else int(len(x) * val_fraction)
        # xor keeps the tutorial's order; the others are split after a seeded shuffle.
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if not n_val:
            order = torch.arange(len(x))
        self.train_x, self.train_y = x[order[n_val:]], y[order[n_val:]]
        self.val_x, self.val_y = x[order[:n_val]], y[order[:n_val]]
        self._train_batches: TensorBatches | None = None
        self._train_state: dict[str, Any] | None = None  # from a checkpoint, for the next loader

    def _batches(self, x: Tensor, y: Tensor, shuffle: bool) -> TensorBatches:
        # Move the whole set to the training device once; every batch is then a view of it.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        return TensorBatches(
            x.to(device), y.to(device), self.batch_size, shuffle, self.seed, rank, world
        )

    def train_dataloader(self) -> TensorBatches:
        batches = self._batches(self.train_x, self.train_y, shuffle=True)
        if self._train_state is not None:
            batches.load_state_dict(self._train_state)
            self._train_state = None
        self._train_batches = batches
        return batches

    def val_dataloader(self) -> TensorBatches | list:
        # An empty list tells Lightning there is no validation (xor).
        if not len(self.val_x):
            return []
        return self._batches(self.val_x, self.val_y, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        # Lightning also saves the training loader's state, but gives it back only to a run
        # resumed within an epoch; a checkpoint saved once an epoch is over (the end of a run,
        # trained further) gets its data order back from here. Mid-epoch both load the same state.
        if self._train_batches is None:
            return {}
        return {"train_batches": self._train_batches.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this before it asks for the training loader.
        self._train_state = state_dict.get("train_batches")
