#!/usr/bin/env bash
# The serving load test on the lent GPU: builtin:sdxl at 1024², 20 steps, batching on
# (--max-batch 8) vs off (--max-batch 1), concurrency 1/4/16. Writes loadtest.md and a log
# into OUT_DIR. Fits one 10-minute device call (materializing SDXL takes ~2 minutes).
#
#   scripts/gpu_serve.sh OUT_DIR
set -uo pipefail
out=${1:?usage: scripts/gpu_serve.sh OUT_DIR}
mkdir -p "$out"
export AUTOQUANT_CACHE_DIR=${AUTOQUANT_CACHE_DIR:-/tmp/autoquant-cache} PYTHONUNBUFFERED=1
log="$out/gpu_serve.log"
echo "== materialize ($(date -u +%T))" | tee -a "$log"
python3 -c "
from autoquant import models
models.materialize(models.resolve('builtin:sdxl'))" >> "$log" 2>&1
args=(--spawn --batching both --steps 20 --requests 12 --time-limit 45
  --server-args "--model builtin:sdxl --device cuda --max-batch 8")
echo "== loadtest ($(date -u +%T))" | tee -a "$log"
python3 scripts/loadtest.py "${args[@]}" > "$out/loadtest.md" 2>> "$log"
echo "loadtest exit $?" >> "$log"
echo "== done ($(date -u +%T))" | tee -a "$log"
