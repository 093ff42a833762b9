"""The contender side: what runs inside each contender process (`bench.py --contender '<json>'`).

`contender_main` sets the process's torch threads, times the GradientMonitor's hooks where a
monitor may run, runs the spec's runner and prints its timings as one line: MARK and JSON.
"""

import json
from typing import Any

from bench_parts import MARK
from bench_parts.contender.clocks import MonitorHookTimer
from bench_parts.contender.fsdp import run_fsdp
from bench_parts.contender.mlp import run_monitored
from bench_parts.contender.xor import run_gradwatch, run_lightning_xor, run_plain

RUNNERS = {
    "plain": run_plain,
    "lightning": run_lightning_xor,
    "gradwatch": run_gradwatch,
    "monitored": run_monitored,
    "fsdp": run_fsdp,
}


def contender_main(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["runner"] in ("gradwatch", "monitored"):
        MonitorHookTimer.install()
    result = RUNNERS[spec["runner"]](spec["params"])
    print(MARK + json.dumps(result), flush=True)
