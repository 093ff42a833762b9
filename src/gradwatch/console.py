"""What a person sees in the terminal while training: the tutorial's loss line and one bar."""

import logging
import sys
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm
from typing_extensions import override

from gradwatch.monitor.sharded import is_sharded

log = logging.getLogger("gradwatch")


def format_tensor(tensor: torch.Tensor) -> str:
    """A tensor as torch prints it, with every digit of float32: the tutorial's first-layer
    gradients are about 1e-4, which torch's default 4 decimals would show as 0.0001."""
    torch.set_printoptions(precision=8, sci_mode=True)
    try:
        return str(tensor.detach().cpu())
    finally:
        torch.set_printoptions(profile="default")


class AboveTheBar:
    """A text stream that prints whole lines above a progress bar: the bar is cleared, the lines
    written, the bar drawn again. A line without its newline yet waits for it, so `print`'s two
    writes (text, then newline) never let the bar in between. Everything else (`fileno`,
    `isatty`, `encoding`) is the wrapped stream's."""

    def __init__(self, stream: TextIO, bar: tqdm) -> None:
        self.stream = stream
        self.bar = bar
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, self.pending = self.pending.rsplit("\n", 1)
            with self.bar.get_lock():
                self.bar.clear(nolock=True)
                self.bar.fp.flush()
                self.stream.write(lines + "\n")
                self.stream.flush()
                self.bar.refresh(nolock=True)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class ConsoleProgress(Callback):
    """Prints `Epoch 500, Loss: 0.2500294446945...` every `print_every` epochs, as the tutorial
    does, under a single progress bar over the whole run's steps (Lightning's own bar restarts
    every epoch: 5000 bars for the tutorial's one-step epochs). At the end it prints the first
    layer's weight gradient, the tensor the tutorial reads to see why training stalls.

    Args:
        print_every: epochs between loss lines; 0 turns them off. The loss printed is the mean of
            the epoch's batch losses (for the tutorial's full batch, the loss of that one step).
        progress_bar: draw the bar (on stderr, when it is a terminal). While the bar is up,
            everything printed or logged to the terminal (alerts, `Final:`, the per-layer table)
            is written above it, and the bar is erased when the last step is done; the log file
            gets the same lines as without a bar. Not a terminal (a pipe, CI): no bar, plain lines.

    Raises:
        ValueError: if `print_every` is not an integer >= 0 or `progress_bar` not a bool.
            Building one prints and writes nothing, so a config is checked before training by
            building its callbacks.
    """

    def __init__(self, print_every: int = 500, progress_bar: bool = True) -> None:
        if isinstance(print_every, bool) or not isinstance(print_every, int) or print_every < 0:
            raise ValueError(f"print_every must be an integer >= 0 (0: never), got {print_every!r}")
        if not isinstance(progress_bar, bool):
            raise ValueError(f"progress_bar must be true or false, got {progress_bar!r}")
        self.print_every = print_every
        self.progress_bar = progress_bar
        self._bar: tqdm | None = None
        # While the bar is up: (owner, attribute, original stream) of each stream swapped for an
        # AboveTheBar, to put back when the bar goes.
        self._swapped: list[tuple[Any, str, TextIO]] = []
        self._loss_sum: torch.Tensor | None = None
        self._batches = 0

    def _prints_this_epoch(self, trainer: "pl.Trainer") -> bool:
        return self.print_every > 0 and (trainer.current_epoch + 1) % self.print_every == 0

    @override
    @rank_zero_only
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.progress_bar:
            total = trainer.estimated_stepping_batches * trainer.accumulate_grad_batches
            bar = tqdm(
                total=int(total) if total != float("inf") else None,
                initial=trainer.global_step * trainer.accumulate_grad_batches,
                unit="batch",
                dynamic_ncols=True,
                mininterval=0.5,
                leave=False,
                # No bar when the output is not a terminal (CI logs, pipes): lines stay clean.
                disable=None,
            )
            if bar.disable:
                return
            self._bar = bar
            self._print_above_the_bar(bar)

    def _print_above_the_bar(self, bar: tqdm) -> None:
        """Swap the terminal's streams, in `sys` and in every logging handler that writes to
        them (Hydra's console handler), for ones that write above the bar. File handlers keep
        their files: train.log gets no bar characters."""
        above = {id(s): AboveTheBar(s, bar) for s in (sys.stdout, sys.stderr)}
        named = logging.Logger.manager.loggerDict.values()
        loggers = [logging.getLogger()] + [lg for lg in named if isinstance(lg, logging.Logger)]
        for handler in {h for lg in loggers for h in lg.handlers}:
            stream = getattr(handler, "stream", None)
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and id(stream) in above
            ):
                handler.setStream(above[id(stream)])
                self._swapped.append((handler, "stream", stream))
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            setattr(sys, name, above[id(stream)])
            self._swapped.append((sys, name, stream))

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if self._bar.n == self._bar.total:  # the last step: erase the bar before the summary
                self._close_bar()
        # Sum losses on the device only in epochs that print: no host sync on the others.
        if self._prints_this_epoch(trainer):
            loss = outputs["loss"].detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += 1

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._loss_sum is None:
            return
        # Under data parallelism each process saw a share of the batch: average the shares.
        loss = trainer.strategy.reduce(self._loss_sum / self._batches, reduce_op="mean")
        self._loss_sum, self._batches = None, 0
        if trainer.is_global_zero:
            # Full precision, as the tutorial prints loss.item(): never round what is reported.
            self.write(f"Epoch {trainer.current_epoch + 1}, Loss: {loss.item()}")

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        name, weight = next(
            ((n, p) for n, p in pl_module.named_parameters() if n.endswith("weight")), (None, None)
        )
        grad = None if weight is None else weight.grad
        if grad is not None and is_sharded(grad):
            # FSDP2: each rank holds some rows; gathering them is a collective every rank joins.
            grad = grad.full_tensor()
        if not trainer.is_global_zero:
            return
        self._close_bar()
        if grad is not None:
            self.write(f"Gradients of the first layer weights ({name.removeprefix('net.')}):")
            self.write(format_tensor(grad))

    @override
    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        self._close_bar()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        """Put the terminal's streams back and erase the bar; a line left without its newline is
        printed after it."""
        if self._bar is None:
            return
        pending = []
        for owner, name, stream in reversed(self._swapped):
            above = getattr(owner, name)
            if isinstance(above, AboveTheBar):
                pending.append((stream, above.pending))
                above.pending = ""
            if isinstance(owner, logging.StreamHandler):
                owner.setStream(stream)
            elif isinstance(above, AboveTheBar):  # unless someone swapped it again since
                setattr(owner, name, stream)
        self._swapped = []
        self._bar.close()
        self._bar.fp.flush()
        self._bar = None
        for stream, text in pending:
            if text:
                stream.write(text)
                stream.flush()

    def write(self, line: str) -> None:
        """Log a line to the console and the run's log file (above the bar, if one is up)."""
        log.info(line)
