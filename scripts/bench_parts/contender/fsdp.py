"""The fsdp block's contender: `scripts/bench_fsdp.py` (the monitor in and out by turns of 50
steps inside one FSDP2 run on 2 CPU processes), run as a child of the contender process, since
Lightning starts its second process by running the script that called `trainer.fit` again."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_parts import ROOT


def run_fsdp(p: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp_bench.json"
        script = ROOT / "scripts" / "bench_fsdp.py"
        cmd = [sys.executable, str(script), "--steps", str(p["steps"]), "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"bench_fsdp.py exit {proc.returncode}:\n" + "\n".join(tail))
        r = json.loads(out.read_text())
    return {
        "fit": r["fit_seconds"],
        "loop": r["loop_seconds"],
        "loop_cpu": r["loop_cpu_seconds"],
        "interleaved_pct": r["logging_steps_cost_pct"],
        "extra": {
            "standard_error_pct": r["logging_steps_standard_error_pct"],
            "whole_windows_pct": r["monitor_cost_pct"],
            "whole_windows_standard_error_pct": r["monitor_cost_standard_error_pct"],
            "paired_median_pct": r["paired_windows_median_pct"],
            "hooks_pct": r["hooks_pct_of_monitored_time"],
            "step_ms_without": r["step_ms_without"],
        },
    }
