#!/usr/bin/env bash
# GPU checks that CI cannot run (it has no GPU): the probe on a real card; `autoquant run` on
# builtin:sdxl at 1024² under per-process memory caps of 6 GB (twice: the second run is a tuning
# cache hit) and 4 GB; a forced bf16 tier under the 6 GB cap (a real OOM, then the fallback);
# bitsandbytes NF4 forced on the card. Writes JSON reports and a log into OUT_DIR.
#
#   scripts/gpu_checks.sh OUT_DIR
#
# On the lent GPU (device tool), with the wheels from ../shared/device/fetch-wheels.sh carried
# in .whl/ and installed to /tmp/site first (see that script's header).
set -uo pipefail
out=${1:?usage: scripts/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export AUTOQUANT_CACHE_DIR=${AUTOQUANT_CACHE_DIR:-/tmp/autoquant-cache} PYTHONUNBUFFERED=1
aq=(python3 -m autoquant)
log="$out/gpu_checks.log"
: > "$log"

step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }
run() {  # run NAME ARGS...: one `autoquant run` on SDXL at 1024², report in OUT/NAME.json
  local name=$1
  shift
  step "run $name: $*"
  /usr/bin/time -f "$name wall %e s" "${aq[@]}" run --model builtin:sdxl --size 1024x1024 \
    --steps 2 --out "/tmp/$name" --json "$@" > "$out/$name.json" 2>> "$log"
  echo "$name exit $?" >> "$log"
}

step probe
"${aq[@]}" probe --json > "$out/probe.json" 2>> "$log"
"${aq[@]}" probe >> "$log" 2>&1

step "materialize builtin:sdxl"
/usr/bin/time -f "materialize wall %e s" python3 -c "
from autoquant import models
models.materialize(models.resolve('builtin:sdxl'))" >> "$log" 2>&1

run sdxl-6GB-first --vram-limit 6GB
run sdxl-6GB-second --vram-limit 6GB
run sdxl-4GB --vram-limit 4GB
cp /tmp/sdxl-4GB/image.png "$out/sdxl-4GB.png" 2>/dev/null
run sdxl-6GB-forced-bf16 --vram-limit 6GB --backend none --precision bf16
run sdxl-bnb-nf4 --backend bitsandbytes --precision nf4
step done
