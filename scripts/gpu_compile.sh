#!/usr/bin/env bash
# The fast path's checks on the lent GPU (issue "The fast path on big cards"): compiled against
# eager, whole pipelines at 1024², each measurement in a fresh process, into OUT_DIR.
#
#   scripts/gpu_compile.sh OUT_DIR SUITE...
#
# Suites:
#   sdxl-cache  scripts/compile_cache.py on SDXL, 30 steps: eager, a cold compile, a warm one from
#               autoquant's saved artifacts (empty inductor cache) and one from torch's own
#               inductor cache; the compiled and eager generations are the steady-state figures
#               (compiled as the calibration says: profiles/latency.yaml compile)
#   sdxl-modes  `autoquant bench` on SDXL, 30 steps: bf16 eager against the other ways to compile
#               it (regional; whole with CUDA graphs), so the calibration's choice is measured
#   flux        `autoquant bench` on Flux-dev, 28 steps: bf16 eager, bf16 compiled (regional),
#               torchao float8 row-wise compiled (with its fidelity against bf16)
#   serve       scripts/loadtest.py on SDXL, 20 steps, concurrency 1/4/16, `serve --compile`
#               never against always, with /metrics' recompile counts
#   serve-restart  scripts/serve_restart.py on SDXL, `serve --compile always`: a first start
#               and a restart with autoquant's cache, each with an empty inductor cache
# GPU_SERVE_COMPILE (default "never always") orders serve's runs.
# GPU_SERVE_LEVEL_SECONDS (default 60) bounds each concurrency level of a serve run.
# GPU_COMPILE_SECONDS (default 560) bounds the call: a suite that would start after it is
# skipped, and each bench gets the time left (its pending tiers are listed in its report).
#
# On the lent GPU (device tool), carrying .whl (../shared/device/fetch-wheels.sh says how). The
# serve suite also needs the serve extra, which the image lacks: fetch-wheels.sh fastapi==0.165.0
# starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
# typing-inspection==0.4.5 opentelemetry-api==1.45.3 (fastapi 0.165 imports opentelemetry at
# import time; httpx, anyio, h11, click and annotated-doc are there).
set -uo pipefail
out=${1:?usage: scripts/gpu_compile.sh OUT_DIR SUITE...}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
started=$SECONDS
limit=${GPU_COMPILE_SECONDS:-560}
log="$out/gpu_compile.log"
: > "$log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export AUTOQUANT_CACHE_DIR=${AUTOQUANT_CACHE_DIR:-/tmp/autoquant-cache} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo "== $* (+$((SECONDS - started)) s)" | tee -a "$log"; }
left() { echo $((limit - (SECONDS - started))); }
materialize() {
  step "materialize $1 on the GPU"
  python3 -c 'import sys; from autoquant import models
print(models.materialize(models.resolve(sys.argv[1]), device="cuda"))' "$1" >> "$log" 2>&1
}
bench() {  # bench NAME MODEL ARGS...: one sweep into OUT/NAME, bounded by the time left
  local name=$1 model=$2
  shift 2
  local budget=$(($(left) - 20))
  if [ "$budget" -lt 60 ]; then step "skipped $name: ${budget} s left"; return; fi
  step "bench $name, ${budget} s"
  timeout -k 5 $((budget + 15)) python3 -m autoquant bench --model "$model" --size 1024x1024 \
    --budgets 80 --repeats 5 --out "/tmp/bench-$name" --time-limit "$budget" "$@" >> "$log" 2>&1
  step "bench $name exited $?"
  mkdir -p "$out/$name"
  cp /tmp/bench-"$name"/bench.json /tmp/bench-"$name"/bench.md "$out/$name/" 2>> "$log"
  (cd "/tmp/bench-$name" && tar -czf "$out/$name/tiers.tar.gz" tiers) 2>> "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
for suite in "$@"; do
  case $suite in
    sdxl-cache)
      materialize builtin:sdxl
      step "compile cache, SDXL"
      timeout -k 5 "$(left)" python3 scripts/compile_cache.py -m builtin:sdxl --size 1024 \
        --steps 30 --device cuda --out "$out/sdxl-cache" >> "$log" 2>&1
      step "compile cache exited $?" ;;
    sdxl-modes)
      materialize builtin:sdxl
      bench sdxl-modes builtin:sdxl --steps 30 --tier-timeout 240 \
        --tiers none:bf16,none:bf16+compile=regional,none:bf16+compile=whole:reduce-overhead ;;
    flux)
      materialize builtin:flux-dev
      bench flux builtin:flux-dev --steps 28 --tier-timeout 420 \
        --tiers none:bf16,none:bf16+compile,torchao:float8+compile ;;
    serve)
      materialize builtin:sdxl
      for compile in ${GPU_SERVE_COMPILE:-never always}; do
        step "loadtest, serve --compile $compile"
        # The server is ready only after compiling and warming up (SDXL compiled on an H100:
        # 163 s to tune, 227 s to warm up), so it may take all the time left.
        timeout -k 5 "$(left)" python3 scripts/loadtest.py --spawn --batching on --steps 20 \
          --requests 16 --concurrency 1,4,16 --time-limit "${GPU_SERVE_LEVEL_SECONDS:-60}" \
          --ready-timeout "$(left)" --server-args \
          "--model builtin:sdxl --device cuda --max-batch 4 --compile $compile" \
          > "$out/loadtest-compile-$compile.md" 2>> "$log"
        step "loadtest exited $?"
      done ;;
    serve-restart)
      step "serve restart, SDXL"
      timeout -k 5 "$(left)" python3 scripts/serve_restart.py --out "$out/serve-restart" \
        --ready-timeout "$(left)" --server-args \
        "--model builtin:sdxl --device cuda --max-batch 4 --compile always" >> "$log" 2>&1
      step "serve restart exited $?" ;;
    *) step "unknown suite $suite" ;;
  esac
done
step done
