"""Costs that Lightning and TensorBoard charge on every step, and equivalents that cost less.

They change Lightning's or TensorBoard's behaviour for the whole process, so the library never
applies them: the command line does, all at once, through :func:`apply_speedups` and
:class:`NoProfiler` (``speedups: true`` in ``conf/config.yaml``; ``speedups=false`` turns every
one of them off, to rule them out when something looks wrong). The four:

The tutorial trains 5000 one-step epochs of under 1 ms each, so a few microseconds a step show:

- Lightning wraps every hook call (about 20 a step, plus about 8 for every callback) in
  ``trainer.profiler.profile(name)``. Its default profiler, which records nothing, still enters a
  generator-based context manager each time: about 1 us a call, 3% of the tutorial's step with no
  callback and more with each. :class:`NoProfiler` records nothing either, with one shared
  ``nullcontext``.
- TensorBoard's event writer checksums every record with CRC32C in pure Python (about 1 ms per
  9 KB, holding the GIL in its writer thread while training runs). :func:`use_fast_crc32c` points
  it at the C implementation of ``google-crc32c`` (same checksum, about 1 us per 9 KB).
- Lightning calls every training hook of every callback on every step (about 8 a step, each
  through a profiler context and a formatted name: 0.7 us each with :class:`NoProfiler`, about 1%
  of the tutorial's step per callback), whether the callback overrides it or not. It skips an
  attribute that is not callable: :func:`skip_unused_step_hooks` sets the per-step hooks a callback
  does not override to ``None`` on the instance, and Lightning passes over them.
- With a datamodule attached, Lightning asks for every batch whether it overrides each of the three
  batch-transfer hooks (``is_overridden``, twice a hook: about 10 us a step, 1.3% of the
  tutorial's). :func:`skip_unused_batch_hooks` tells Lightning's hook selector, once, that a
  datamodule overriding none of them has none: the module's own hooks run, as they would anyway.
"""

import contextlib

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

_NO_CONTEXT = contextlib.nullcontext()
# Called on every training step or epoch through `_call_callback_hooks`, which checks
# `callable(getattr(callback, name))` first. (Never state_dict or on_save_checkpoint: Lightning
# calls those directly.)
STEP_HOOKS = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
)


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler (records nothing, reports nothing) without the cost of a new
    context manager per hook call. Pass ``trainer.profiler=simple`` (or any other) to profile."""

    @override
    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return _NO_CONTEXT


def skip_unused_step_hooks(callback: Callback) -> Callback:
    """Sets each of `STEP_HOOKS` that ``callback``'s class leaves as Lightning's no-op to ``None``
    on the instance, so that Lightning's dispatch passes over it; returns the callback."""
    for name in STEP_HOOKS:
        if getattr(type(callback), name, None) is getattr(Callback, name):
            setattr(callback, name, None)
    return callback


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (what TensorBoard's writer computes), in C."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def use_fast_crc32c() -> bool:
    """Make TensorBoard's record writer use :func:`masked_crc32c`; True if it does. Without
    ``google-crc32c``'s C extension TensorBoard keeps its own, which gives the same bytes."""
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if google_crc32c.implementation != "c":
        return False
    record_writer.masked_crc32c = masked_crc32c
    return True


def apply_speedups(callbacks: list[Callback]) -> list[Callback]:
    """Every speed-up of this module but the profiler (the caller passes ``NoProfiler()`` when no
    other profiler is asked for): TensorBoard's checksums in C, the per-step hooks that each
    callback leaves as Lightning's no-op skipped, and the datamodule's unused batch-transfer hooks
    skipped once it is attached. Returns the callbacks to give the Trainer."""
    use_fast_crc32c()
    callbacks = [*callbacks, SkipUnusedBatchHooks()]
    for callback in callbacks:
        skip_unused_step_hooks(callback)
    return callbacks


class SkipUnusedBatchHooks(Callback):
    """Applies :func:`skip_unused_batch_hooks` to the Trainer's datamodule in ``setup``, when
    Lightning has attached it."""

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if trainer.datamodule is not None:
            skip_unused_batch_hooks(trainer.datamodule)


def skip_unused_batch_hooks(datamodule: pl.LightningDataModule) -> bool:
    """Once the datamodule is attached: if it overrides none of the batch-transfer hooks,
    Lightning's per-batch selector stops asking it. True if it did. Lightning's own data connector
    holds the selector; where it is not as expected (another Lightning), nothing changes."""
    trainer = datamodule.trainer
    connector = getattr(trainer, "_data_connector", None)
    selector = getattr(connector, "_datahook_selector", None)
    if selector is None or getattr(selector, "datamodule", None) is not datamodule:
        return False
    if any(is_overridden(hook, datamodule) for hook in selector._valid_hooks):
        return False
    selector.datamodule = None
    return True
