"""Runs the zoo's cases with the gradient monitor at its defaults and scores what it said.

A broken case is diagnosed right when the first alert it gets (at the step of its first alert)
is of the expected kind, names the expected layer where one is at fault, and comes within
``WITHIN`` steps; a healthy case is right when it gets no alert at all.
"""

import contextlib
import io
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from gradwatch.data import TensorBatches
from gradwatch.monitor import GradientMonitor
from gradwatch.zoo.cases import Case

WITHIN = 500
LOG_EVERY = 10


@dataclass
class Result:
    case: Case
    alerts: list[dict] = field(default_factory=list)  # as in gradients.json
    seconds: float = 0.0
    error: str = ""

    @property
    def first(self) -> list[dict]:
        """The alerts of the first step with any."""
        if not self.alerts:
            return []
        step = self.alerts[0]["step"]
        return [a for a in self.alerts if a["step"] == step]

    @property
    def said(self) -> str:
        if self.error:
            return f"crashed: {self.error}"
        shown = [
            f"{a['kind']} ({', '.join(a['layers'])})" if a["layers"] else a["kind"]
            for a in self.first
        ]
        later = len({a["kind"] for a in self.alerts}) - len({a["kind"] for a in self.first})
        return "; ".join(shown) + (f" (+{later} later)" if later > 0 else "") or "nothing"

    @property
    def right(self) -> bool:
        if self.error:
            return False
        expected = self.case.expected
        if expected is None:
            return not self.alerts
        return any(
            a["kind"] == expected
            and a["step"] < WITHIN
            and (self.case.layer is None or self.case.layer in a["layers"])
            for a in self.first
        )


def run_case(case: Case, seed: int = 0, monitor_kwargs: dict | None = None) -> Result:
    """Trains the case for its steps with a default GradientMonitor (or one with
    ``monitor_kwargs``); its alerts and time."""
    module, (x, y), batch_size = case.build()
    gpu = case.fp16 and torch.cuda.is_available()
    # fp16 with a GradScaler: on CUDA, or else CPU autocast with a CPU scaler.
    cpu_fp16 = case.fp16 and not gpu
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    start = time.perf_counter()
    # The monitor's end-of-run table goes to stdout: the zoo prints its own.
    quiet = contextlib.redirect_stdout(io.StringIO())
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")  # alerts are read from the monitor, not the console
        monitor = GradientMonitor(**{"histogram_every_n_steps": 0, **(monitor_kwargs or {})})
        trainer = pl.Trainer(
            accelerator="gpu" if gpu else "cpu",
            devices=1,
            precision="16-mixed" if gpu else case.precision,
            plugins=plugins if cpu_fp16 else None,
            max_steps=case.steps,
            max_epochs=-1,
            log_every_n_steps=LOG_EVERY,
            logger=TensorBoardLogger(tmp, name="zoo"),
            callbacks=[monitor],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp,
        )
        if gpu:
            x, y = x.cuda(), y.cuda()
        batches = TensorBatches(x, y, batch_size, shuffle=True, seed=seed)
        try:
            trainer.fit(module, train_dataloaders=batches)
        except Exception as e:  # a crash is a result of the zoo, not the end of it
            return Result(
                case, monitor.summary()["alerts"], time.perf_counter() - start, error=repr(e)[:80]
            )
    return Result(case, monitor.summary()["alerts"], time.perf_counter() - start)


def table(results: list[Result]) -> str:
    """A Markdown table of the results, then recall over the broken cases and false alarms over
    the healthy ones."""
    lines = [
        "| case | expected | gradwatch said | first step | verdict | s |",
        "|---|---|---|---:|---|---:|",
    ]
    for r in results:
        expected = r.case.expected or "no alert"
        if r.case.layer:
            expected += f" ({r.case.layer})"
        step = r.first[0]["step"] if r.first else "-"
        verdict = "right" if r.right else "WRONG"
        lines.append(
            f"| {r.case.name} | {expected} | {r.said} | {step} | {verdict} | {r.seconds:.1f} |"
        )
    broken = [r for r in results if r.case.expected]
    healthy = [r for r in results if r.case.expected is None]
    recall = sum(bool(r.right) for r in broken)
    alarms = sum(not r.right for r in healthy)
    lines += [
        "",
        f"recall: {recall}/{len(broken)} broken cases diagnosed right; false alarms: {alarms}/"
        f"{len(healthy)} healthy cases",
    ]
    return "\n".join(lines)
