"""The parts of `scripts/bench.py`, the runner, which stays one small file.

- `contender/`: what runs inside each contender process (`bench.py --contender '<json>'`):
  `clocks` (the loop clock, the monitor's hook timer, the in-run A/B), `xor` (the tutorial's
  plain loop, Lightning on XOR, gradwatch's own entry), `mlp` (the monitored MLP of the mid,
  depth and gpu blocks); the package itself dispatches a spec to its runner.
- `blocks/`: which contenders each block runs, one module per block.
- `targets`: the targets of the issue, checked on the summarised rows, and the Markdown table.

Like the runner, every module here imports only the standard library at its top level (the
plain contender's process time is the plain script's): torch, Lightning and gradwatch are
imported inside the functions that use them.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
# A contender prints its timings as one line: MARK followed by JSON.
MARK = "BENCH_RESULT "
METRICS = ("fit", "loop", "loop_cpu", "process")
