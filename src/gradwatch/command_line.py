"""What the command line changes for its whole process, and a library must not: the console's
warnings, Hydra's and TensorBoard's error reports. Only `gradwatch.train.main` calls these."""

import difflib
import logging
import os
import sys
import threading
import warnings

import hydra._internal.utils as hydra_internal_utils
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

from gradwatch.monitor import GradientAlert

log = logging.getLogger("gradwatch")


def quiet_known_warnings() -> None:
    """Warnings that say nothing to a user of gradwatch are left out, and gradient alerts print
    as log lines."""
    # One-step epochs are the point of the tutorial's run, not a mistake to warn about.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # A dataset without a held-out split (xor) returns no validation batches on purpose.
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
    # Lightning 2.6 against torch 2.13: an internal deprecation, nothing a user can act on.
    warnings.filterwarnings(
        "ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"
    )
    python_showwarning = warnings.showwarning

    def show_alerts_as_log_lines(message, category, filename, lineno, file=None, line=None):
        # Gradient alerts are for people: one clean line in the console and train.log, not a
        # warning with a source location.
        if issubclass(category, GradientAlert):
            log.warning(f"ALERT {message}")
        else:
            python_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = show_alerts_as_log_lines


def quiet_this_process() -> None:
    """:func:`quiet_known_warnings` and :func:`quiet_writer_thread_errors`, once per process.
    `main` calls it, and so does the task function: Hydra's launcher plugins (submitit) run each
    job in a process of its own, where `main` never ran, and its alerts would print as Python
    warnings on stderr instead of log lines in `train.log`."""
    global _process_quieted
    if not _process_quieted:
        quiet_known_warnings()
        quiet_writer_thread_errors()
        _process_quieted = True


_process_quieted = False


def quiet_writer_thread_errors() -> None:
    """A write that fails in TensorBoard's writer thread (a full disk) is raised again in the
    training thread at its next write, and reported there in a line: the thread's own traceback
    would only bury that line. Process-wide, so only `main` calls it."""
    python_excepthook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if not (
            isinstance(args.exc_value, OSError) and isinstance(args.thread, _AsyncWriterThread)
        ):
            python_excepthook(args)

    threading.excepthook = excepthook


# Options that Hydra's plugins bring, and the optional extra (pyproject.toml) that installs each.
PLUGIN_EXTRAS = {
    "hydra/launcher/submitit_local": "submitit",
    "hydra/launcher/submitit_slurm": "submitit",
    "hydra/sweeper/optuna": "optuna",
}


def plugin_hint(missing_config: str) -> str:
    """For an option a plugin brings: the command that installs it; "" for any other."""
    extra = PLUGIN_EXTRAS.get(missing_config)
    if extra is None:
        return ""
    group, _, name = missing_config.rpartition("/")
    return f"\n{group}={name} comes with the {extra} extra: .venv/bin/pip install -e '.[{extra}]'"


def short_hydra_errors() -> None:
    """A command line Hydra cannot compose (a misspelled option or key) is reported in a line or
    two, the options there included, without Hydra's config search path and stack trace hint
    (HYDRA_FULL_ERROR=1 still gives the whole trace). Hydra prints these before any config
    exists, so no setting of it can: its reporting function (private, hydra-core pinned) is
    wrapped."""

    def short_compose_error(error: Exception) -> str:
        cause = error.__cause__
        options, missing = getattr(error, "options", None), getattr(error, "missing_cfg_file", "")
        if options is not None and "/" in (missing or ""):  # optimizer=adamm
            group, _, name = missing.rpartition("/")
            return (
                f"Unknown option {group}={name}. Options in '{group}': {', '.join(options)}"
                + plugin_hint(missing)
            )
        parent = getattr(cause, "parent_node", None)
        if isinstance(cause, OmegaConfBaseException) and isinstance(parent, DictConfig):
            # trainer.max_epoch=3: the key it is close to, or the keys there are.
            full_key, key = str(cause.full_key), str(cause.key)
            where = full_key.rpartition(".")[0]
            keys = [str(k) for k in parent.keys() if not str(k).startswith("_")]
            close = difflib.get_close_matches(key, keys, n=1)
            hint = (
                f"Did you mean '{where + '.' if where else ''}{close[0]}'?"
                if close
                else f"Keys there: {', '.join(keys)} (a new one: +{full_key}=...)."
            )
            return f"Could not override '{full_key}': Key '{key}' is not in struct. {hint}"
        # Anything else as Hydra words it, less the config search path it appends.
        lines = [str(error).split("\nConfig search path:")[0].strip()]
        if isinstance(cause, OmegaConfBaseException):
            lines.append(str(cause).strip())
        return "\n".join(lines) + plugin_hint(missing or "")

    hydra_run_and_report = hydra_internal_utils.run_and_report

    def run_and_report(func):
        def compose_errors_in_short():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(short_compose_error(error), file=sys.stderr)
                sys.exit(1)

        return hydra_run_and_report(compose_errors_in_short)

    hydra_internal_utils.run_and_report = run_and_report
