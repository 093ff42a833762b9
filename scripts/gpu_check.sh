#!/usr/bin/env bash
# The checks that need CUDA, in one go: the GPU tests, one `make train` on the GPU, the bench's
# gpu block. Each step has its own time limit and writes its log to $OUT (default outputs/gpu_check)
# as it goes, so a step that hangs leaves the others' results.
#   PY=python3 scripts/gpu_check.sh        (default PY: .venv/bin/python)
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/gpu_check}
REPEATS=${REPEATS:-3}  # BENCH_ARGS="--only monitor,..." narrows the bench; BENCH_LIMIT its seconds
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import sys, torch, lightning, tensorboard; print(sys.version.split()[0], torch.__version__, lightning.__version__, tensorboard.__version__, torch.cuda.get_device_name())"
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/
step train 90 "$PY" -m gradwatch.train trainer=gpu "paths.root=$OUT/runs"
step bench "${BENCH_LIMIT:-300}" "$PY" scripts/bench.py --blocks gpu --repeats "$REPEATS" --out "$OUT" ${BENCH_ARGS:-}
