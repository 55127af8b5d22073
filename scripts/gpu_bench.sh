#!/usr/bin/env bash
# `autoquant bench` on the lent GPU (one H100/H200, 16 cores, a fresh machine each call, at most
# 10 minutes a call): install the carried wheels, materialize MODEL on the GPU, run the sweep at
# budgets 4,6,8,12,16,24,48,80 GB under a time guard, and leave five files in OUT: bench.json,
# bench.md, bench.png, bench.log and results.tar.gz (per-tier JSONs; --confirm and --run-plan
# reports).
#
#   scripts/gpu_bench.sh MODEL OUT [bench args...]
#   scripts/gpu_bench.sh builtin:sdxl "$OUT" --tiers none:bf16,bitsandbytes:nf4,quanto:int8
#
# Extra args go to `python -m autoquant bench` after the defaults, so they win (e.g. a
# different --budgets). GPU_BENCH_SECONDS (default 540) bounds the whole call: the sweep gets
# what the install and the materialization left, less 30 s for the reports and the packing; a
# tier still running then is stopped and listed as not run. The reference tier (bf16) runs in
# every call. To merge calls: unpack each results.tar.gz into one folder (their tiers/ merge),
# then `python -m autoquant bench --model MODEL --out FOLDER --report-only`.
#
# Run from the repo root with carry: [".whl"] (see ../shared/device/fetch-wheels.sh).
set -uo pipefail
started=$(date +%s)
usage="usage: scripts/gpu_bench.sh MODEL OUT [bench args...]"
model=${1:?$usage}
out=${2:?$usage}
shift 2
limit=${GPU_BENCH_SECONDS:-540}
work=${GPU_BENCH_WORK:-/tmp/autoquant-bench}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
log="$out/bench.log"
: > "$log"
cd "$(dirname "$0")/.."

step() { echo "== $* (+$(( $(date +%s) - started )) s)" | tee -a "$log"; }

if [ -d .whl ]; then
  step "install wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$log" 2>&1 || { step "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export AUTOQUANT_CACHE_DIR=${AUTOQUANT_CACHE_DIR:-/tmp/autoquant-cache}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1

# The RNG on the GPU builds Flux-dev's 17 B parameters in seconds; writing them takes longer.
step "materialize $model on the GPU"
python3 -c 'import sys; from autoquant import models
print(models.materialize(models.resolve(sys.argv[1]), device="cuda"))' "$model" >> "$log" 2>&1 \
  || { step "materialize failed"; exit 1; }

left=$(( limit - ($(date +%s) - started) - 30 ))
[ "$left" -ge 60 ] || { step "only ${left} s left after the set-up: no bench"; exit 1; }
step "bench, ${left} s left"
timeout -k 5 $(( left + 20 )) python3 -m autoquant bench --model "$model" \
  --budgets 4,6,8,12,16,24,48,80 --out "$work" --time-limit "$left" "$@" >> "$log" 2>&1
step "bench exited with $?"

cp "$work"/bench.json "$work"/bench.md "$work"/bench.png "$out"/ 2>> "$log"
parts=$(cd "$work" && ls -d tiers confirm runs 2>/dev/null)
# Images of the --run-plan runs stay behind: only the JSON and Markdown reports come back.
[ -n "$parts" ] && tar -czf "$out/results.tar.gz" -C "$work" --exclude='*.png' $parts
step "done: $(ls "$out" | tr '\n' ' ')"
