"""Checkpoints a run can always resume from: on a cadence, at the end, and on Ctrl-C or SIGTERM.

A checkpoint file is written to a temporary name and renamed into place, so a hard kill leaves
the previous `last.ckpt` whole, never a half-written one.
"""

import errno
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

log = logging.getLogger("gradwatch")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to `<path>.tmp`, then renames over `<path>`: the rename is atomic on one filesystem."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, partial, storage_options)
        if not partial.is_file():  # Lightning's _atomic_save swallows a PermissionError
            raise PermissionError(errno.EACCES, "Permission denied", str(partial))
        os.replace(partial, path)


class RunCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps, at the end of training, and when
    the run is interrupted (SIGINT or SIGTERM): the interruption is taken at the next step
    boundary, so the checkpoint is consistent and resuming from it is exact.

    Args:
        dirpath: where `last.ckpt` goes (the run directory's `checkpoints/`).
        every_n_train_steps: the cadence; a one-step-per-epoch run cannot afford every epoch.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 1000) -> None:
        if every_n_train_steps < 1:
            raise ValueError(
                f"checkpoint every_n_train_steps must be >= 1, got {every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _save_last_now(self, trainer: "pl.Trainer") -> None:
        trainer.save_checkpoint(self.last_path)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Under several processes Lightning's own handling applies: a flag set in one process
        # at one step and in another at the next would deadlock a collective.
        if trainer.world_size == 1:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.stop_signal is not None:
            self._save_last_now(trainer)
            name = signal.Signals(self.stop_signal).name
            log.info(f"{name} received: saved {self.last_path} at step {trainer.global_step}.")
            # Lightning's interrupt path: callbacks' on_exception, loggers flushed, exit 1.
            raise KeyboardInterrupt

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_handlers()
        # Whatever the cadence, last.ckpt holds the end of training.
        self._save_last_now(trainer)

    @override
    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        self._restore_handlers()
        if trainer.is_global_zero and self.last_path.exists():
            run_dir = self.last_path.parent.parent
            log.info(f"Training stopped early. Resume with: make train ckpt_path={run_dir}")

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
