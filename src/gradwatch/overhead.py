"""Costs that Lightning and TensorBoard charge on every step, and equivalents that cost less.

The tutorial trains 5000 one-step epochs of about 0.9 ms each, so a few microseconds a step show:

- Lightning wraps every hook call (about 20 a step, plus about 8 for every callback) in
  ``trainer.profiler.profile(name)``. Its default profiler, which records nothing, still enters a
  generator-based context manager each time: about 1 us a call, 3% of the tutorial's step with no
  callback and more with each. :class:`NoProfiler` records nothing either, with one shared
  ``nullcontext``.
- TensorBoard's event writer checksums every record with CRC32C in pure Python (about 1 ms per
  9 KB, holding the GIL in its writer thread while training runs). :func:`use_fast_crc32c` points
  it at the C implementation of ``google-crc32c`` (same checksum, about 1 us per 9 KB).
- With a datamodule attached, Lightning asks for every batch whether it overrides each of the three
  batch-transfer hooks (``is_overridden``, twice a hook: about 10 us a step, 1.3% of the
  tutorial's). :func:`skip_unused_batch_hooks` tells Lightning's hook selector, once, that a
  datamodule overriding none of them has none: the module's own hooks run, as they would anyway.
"""

import contextlib

import lightning.pytorch as pl
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

_NO_CONTEXT = contextlib.nullcontext()


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler (records nothing, reports nothing) without the cost of a new
    context manager per hook call. Pass ``trainer.profiler=simple`` (or any other) to profile."""

    @override
    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return _NO_CONTEXT


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


def skip_unused_batch_hooks(datamodule: pl.LightningDataModule) -> bool:
    """Call from the datamodule's ``setup``: if it overrides none of the batch-transfer hooks,
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
