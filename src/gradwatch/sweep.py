"""Hydra multirun support: a failing job is reported at once, and the sweep ends with a table
of every job ranked by final loss, with its gradient alerts.

Registered in conf/config.yaml under `hydra.callbacks`; Hydra calls it in single runs too,
where it does nothing.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("gradwatch")

FAILED_FILE = "failed.txt"


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under `sweep_dir`: its overrides, metrics or failure."""
    rows = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        metrics_file, failed_file = job_dir / "metrics.json", job_dir / FAILED_FILE
        if failed_file.exists():
            error = failed_file.read_text().strip().splitlines()[-1]
            rows.append({"job": job_dir.name, "status": "failed", "error": error})
        elif metrics_file.exists():
            rows.append(
                {"job": job_dir.name, "status": "ok", **json.loads(metrics_file.read_text())}
            )
    # Finished jobs first, best (lowest) final loss on top; failures last.
    return sorted(rows, key=lambda r: (r["status"] != "ok", r.get("train/loss", float("inf"))))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: rank, job, final loss, accuracy, final gradient norm, alerts."""
    lines = [
        "| rank | job | train/loss | train/acc | grad_norm/total | alerts |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for rank, row in enumerate(rows, 1):
        if row["status"] != "ok":
            lines.append(f"| {rank} | {row['job']} | FAILED: {row['error']} | | | |")
            continue
        cells = [
            f"{row[key]:.6g}" if key in row else "-"
            for key in ("train/loss", "train/acc", "grad_norm/total")
        ]
        kinds = [
            f"{k.removeprefix('alerts/')} x{v}" for k, v in row.items() if k.startswith("alerts/")
        ]
        cells.append(", ".join(kinds) or ("none" if "alerts" in row else "-"))
        lines.append(f"| {rank} | {row['job']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class SweepReport(Callback):
    """At the end of a multirun: print and save (`sweep_results.md`) the ranked table; exit 1 if
    any job failed, after every other job has run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_jobs(sweep_dir)
        table = format_table(rows)
        (sweep_dir / "sweep_results.md").write_text(table + "\n")
        log.info(f"Sweep results ({sweep_dir}):\n{table}")
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            log.error(f"{len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}")
            sys.exit(1)
