"""Checkpoints a run can always resume from: on a cadence, at the end, and on Ctrl-C or SIGTERM.

A checkpoint file is written to a temporary name and renamed into place, so a hard kill leaves
the previous `last.ckpt` whole, never a half-written one.
"""

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

log = logging.getLogger("gradwatch")

# Under several processes, about how often (in seconds of training) the ranks agree on a stop:
# a collective at every step costs as much as a small network's step, and a signal must still be
# acted on well within a scheduler's grace period before SIGKILL.
AGREE_EVERY_SECONDS = 0.5


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


class RunCheckpoint(Callback):
    """`last.ckpt` every `every_n_train_steps` optimizer steps, at the end of training, and when
    the run is interrupted (SIGINT or SIGTERM). The interruption is taken at the next step
    boundary, so the checkpoint is consistent and resuming from it is exact; under several
    processes, at the first step boundary where the ranks agree on it (about every
    AGREE_EVERY_SECONDS), whichever rank received it. Weights that are no longer finite (a
    diverged run) are never saved: `last.ckpt` keeps the last good state.

    Args:
        dirpath: where `last.ckpt` goes (the run directory's `checkpoints/`).
        every_n_train_steps: the cadence; a one-step-per-epoch run cannot afford every epoch.

    Raises:
        ValueError: if `dirpath` is not a path or `every_n_train_steps` not an integer >= 1.
            Building one writes nothing (the folder is made at the first save), so a config is
            checked before training by building its callbacks.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 1000) -> None:
        if not isinstance(dirpath, str | os.PathLike) or not str(dirpath):
            raise ValueError(f"dirpath must be a folder path, got {dirpath!r}")
        if (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):
            raise ValueError(
                f"every_n_train_steps must be an integer >= 1, got {every_n_train_steps!r}"
            )
        self.last_path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.stop_signal: int | None = None
        self._stopping = False  # saved after a stop signal: stop at the next hook
        self._stopped_by = signal.SIGTERM  # the signal, on whichever rank it arrived
        self._save_at_epoch_end = False  # a save due after an epoch's last batch: see _save
        # Several processes: they agree on a stop every `_agree_every` batches (the same on every
        # rank), counted down in `_batches_to_agree`.
        self._agree = False
        self._agree_every = self._batches_to_agree = 1
        self._agreed_at = 0.0
        self._saved_step = -1
        self._previous_handlers: dict[int, Any] = {}

    def save(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Write last.ckpt now, unless it already holds this step or the weights diverged."""
        if self._saved_step == trainer.global_step:
            return
        # One host sync per checkpoint: a NaN or Inf weight must not replace a good checkpoint.
        finite = torch.stack([p.isfinite().all() for p in pl_module.parameters()]).all()
        if not finite.item():
            if trainer.is_global_zero:
                log.warning(
                    f"Not checkpointing step {trainer.global_step}: the weights are not finite. "
                    f"{self.last_path} keeps the last good state."
                )
            return
        trainer.save_checkpoint(self.last_path)
        self._saved_step = trainer.global_step

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._saved_step = trainer.global_step  # a resumed run starts from a saved step
        # Under several processes a signal may reach one rank (SIGTERM to the launching process)
        # or each at a different step (Ctrl-C): the ranks agree on it at a step boundary, so they
        # all save and stop at the same step and no collective is left waiting. These handlers
        # replace Lightning's SIGTERM handler, whose collective inside the handler and stops
        # taken by each rank alone can leave the ranks in different collectives.
        self._agree = trainer.world_size > 1
        self._agree_every = self._batches_to_agree = 1
        self._agreed_at = time.monotonic()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        # Only a flag: a handler runs between any two bytecodes, where a save or a collective
        # is not safe.
        if self.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _signal_on_any_rank(self, trainer: "pl.Trainer") -> int | None:
        """The signal any rank received (the largest number), the same on every rank; None
        between the batches where the ranks agree. Each agreement sets when the next is: every
        rank proposes the batches of about AGREE_EVERY_SECONDS at its pace, the fewest win."""
        self._batches_to_agree -= 1
        if self._batches_to_agree > 0:
            return None
        per_batch = max(time.monotonic() - self._agreed_at, 1e-6) / self._agree_every
        proposal = max(1, int(AGREE_EVERY_SECONDS / per_batch))
        values = torch.tensor(
            [self.stop_signal or 0, -proposal], device=trainer.strategy.root_device
        )
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        signum, fewest = values.tolist()
        self._agree_every = self._batches_to_agree = -fewest
        self._agreed_at = time.monotonic()
        return signum or None

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stopping:
            return
        stop_signal = self._signal_on_any_rank(trainer) if self._agree else self.stop_signal
        if stop_signal is not None:
            # Stop at the next hook, once Lightning has written this step's `self.log` values
            # (it does so after every on_train_batch_end): the resumed run starts after them.
            self._stopping, self._stopped_by = True, stop_signal
            self._save_at_step_boundary(trainer, pl_module)
            return
        if trainer.global_step % self.every_n_train_steps == 0:
            self._save_at_step_boundary(trainer, pl_module)

    def _save_at_step_boundary(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> None:
        """Save now, or, after an epoch's last batch, at the epoch's end, once Lightning has
        counted the epoch as processed. Lightning's loops, resumed from a checkpoint taken
        between an epoch's last batch and that count, miscount the epochs that follow: the run
        resumed again from one of its checkpoints would train a step too many."""
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_at_epoch_end = True
        else:
            self._save_and_report(trainer, pl_module)

    def _save_and_report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.save(trainer, pl_module)  # every rank: a checkpoint save is a collective
        if self._stopping and trainer.is_global_zero:
            name = signal.Signals(self._stopped_by).name
            log.info(f"{name} received: saved {self.last_path} at step {self._saved_step}.")

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", *args: Any) -> None:
        self._stop_if_asked()

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stop_if_asked()

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            self._save_and_report(trainer, pl_module)
        self._stop_if_asked()

    def _stop_if_asked(self) -> None:
        if self._stopping and not self._save_at_epoch_end:
            # Lightning's interrupt path: callbacks' on_exception, loggers flushed, exit 1.
            raise KeyboardInterrupt

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_handlers()
        # Whatever the cadence, last.ckpt holds the end of training.
        self.save(trainer, pl_module)

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
