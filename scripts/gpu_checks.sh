#!/usr/bin/env bash
# GPU checks that CI cannot run (it has no GPU): the probe on a real card, and `autoquant run`
# on builtin:sdxl at 1024² under per-process memory caps of 6 GB and 4 GB (real OOMs past the
# cap), plus bitsandbytes NF4 forced on the card. Writes JSON reports and a log into OUT_DIR.
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

step probe
"${aq[@]}" probe --json > "$out/probe.json" 2>> "$log"
"${aq[@]}" probe >> "$log" 2>&1

for cap in 6GB 4GB; do
  step "run sdxl 1024x1024 --vram-limit $cap"
  /usr/bin/time -f "wall %e s" "${aq[@]}" run --model builtin:sdxl --size 1024x1024 --steps 2 \
    --vram-limit "$cap" --out "/tmp/run-$cap" --json > "$out/run-$cap.json" 2>> "$log"
  echo "exit $?" >> "$log"
done
cp /tmp/run-4GB/image.png "$out/sdxl-4GB.png" 2>/dev/null

step "run sdxl 1024x1024 forced bitsandbytes nf4"
"${aq[@]}" run --model builtin:sdxl --size 1024x1024 --steps 2 --backend bitsandbytes \
  --precision nf4 --out /tmp/run-nf4 --json > "$out/run-nf4.json" 2>> "$log"
echo "exit $?" >> "$log"
step done
