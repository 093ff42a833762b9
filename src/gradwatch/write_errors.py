"""A write that failed during training (a full disk, a folder made read-only), told in a line:
which of the run's files, why, and whether the run's last checkpoint is whole to resume from."""

import errno
import os
from pathlib import Path
from typing import Any

from gradwatch.resume import check_checkpoint
from gradwatch.validate import ConfigError


def describe_write_error(error: OSError, run_dir: str | Path) -> str:
    """One line for a write that failed during training (disk full, read-only folder): which
    file, why, and whether the run's last checkpoint is still whole to resume from."""
    message = f"cannot write {failed_file(error, run_dir) or run_dir}: {error.strerror or error}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (the disk is full)"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        message += " (the folder is read-only)"
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        try:
            step = check_checkpoint(last)["global_step"]
        except ConfigError:
            return message + f". {last} is damaged: resume from an earlier run"
        return message + f". {last} (step {step}) is whole: resume with ckpt_path={run_dir}"
    return message + ". No checkpoint was written before: the run cannot be resumed"


def failed_file(error: OSError, run_dir: str | Path) -> str | None:
    """The run's file that a failed write was writing. The error's own file names are not always
    it: a checkpoint is written to a temporary file elsewhere and copied into place (shutil names
    the source first, the run's file second), and a write to an open file (TensorBoard's event
    file, from its writer thread) names none. So: the last path inside the run directory among
    the error's file names and, deepest last, the `filename`, `path` and `dst` of the frames of
    its traceback; else the error's own file name."""
    run_dir = Path(run_dir).absolute()
    candidates = [error.filename, error.filename2]
    tb = error.__traceback__
    while tb is not None:
        candidates += [tb.tb_frame.f_locals.get(name) for name in ("filename", "path", "dst")]
        tb = tb.tb_next
    inside = [
        str(path)
        for path in (Path(os.fsdecode(c)).absolute() for c in candidates if _is_path(c))
        if path.is_relative_to(run_dir)
    ]
    return inside[-1] if inside else (str(error.filename) if error.filename else None)


def _is_path(value: Any) -> bool:
    return isinstance(value, str | bytes | os.PathLike) and bool(value)
