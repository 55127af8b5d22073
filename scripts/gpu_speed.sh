#!/usr/bin/env bash
# The latency model's checks on the lent GPU (issue "Tune for speed"): `autoquant run` with no
# tier forced under real caps, and the forced plans it is compared with, each one JSON report
# under OUT_DIR, then a table of chosen plan, predicted and measured seconds, peaks.
#
#   scripts/gpu_speed.sh OUT_DIR SUITE...
#
# Suites: flux (Flux-dev 1024², 20 steps, at 8, 10, 12, 16 and 24 GB), sdxl (SDXL 1024², 20
# steps, at 4 and 5 GB, with NF4 + text encoders + VAE tiling forced at the same caps),
# bandwidth (scripts/gpu_bandwidth.py), streams (group offload on CUDA streams forced on SDXL:
# bf16 under 10 GB, torchao int8 under 4 GB), cpu-te (the text encoders on the host's CPU
# offered: SDXL at 4 GB, then Flux-dev at GPU_SPEED_FLUX_CAPS, default 10 GB, with the host's
# CPU in the log), final (Flux-dev at 10 GB and SDXL at 6 GB). GPU_SPEED_SECONDS (default 560)
# bounds the call: a run that would start after it is skipped and listed;
# GPU_SPEED_RUN_SECONDS (default 200) bounds each run (a plan that falls back to a slow tier is
# stopped there, and its report is missing).
#
# On the lent GPU (device tool), carrying .whl (../shared/device/fetch-wheels.sh says how).
set -uo pipefail
out=${1:?usage: scripts/gpu_speed.sh OUT_DIR SUITE...}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
started=$SECONDS
limit=${GPU_SPEED_SECONDS:-560}
run_limit=${GPU_SPEED_RUN_SECONDS:-200}
log="$out/gpu_speed.log"
: > "$log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export AUTOQUANT_CACHE_DIR=${AUTOQUANT_CACHE_DIR:-/tmp/autoquant-cache} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo "== $* (+$((SECONDS - started)) s)" | tee -a "$log"; }
materialize() {
  step "materialize $1 on the GPU"
  python3 -c 'import sys; from autoquant import models
print(models.materialize(models.resolve(sys.argv[1]), device="cuda"))' "$1" >> "$log" 2>&1
}
run() {  # run NAME ARGS...: one `autoquant run --json`, its report in OUT/NAME.json
  local name=$1
  shift
  if [ $((SECONDS - started)) -gt "$limit" ]; then
    step "skipped $name: past the time guard"
    return
  fi
  step "run $name: $*"
  local began=$SECONDS
  local left=$((limit + 30 - (SECONDS - started)))
  timeout -k 5 $((left < run_limit ? left : run_limit)) \
    python3 -m autoquant run --json --retune --out "/tmp/out-$name" "$@" > "$out/$name.json" 2>> "$log"
  echo "$name exit $? after $((SECONDS - began)) s" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
for suite in "$@"; do
  case $suite in
    bandwidth)
      step bandwidth
      python3 scripts/gpu_bandwidth.py "$out/bandwidth.json" >> "$log" 2>&1 ;;
    flux)
      materialize builtin:flux-dev
      for cap in ${GPU_SPEED_FLUX_CAPS:-10GB 8GB 16GB 24GB 12GB}; do
        run "flux-$cap" -m builtin:flux-dev --size 1024x1024 --steps 20 --vram-limit "$cap"
      done ;;
    sdxl)
      materialize builtin:sdxl
      for cap in 4GB 5GB; do
        run "sdxl-$cap" -m builtin:sdxl --size 1024x1024 --steps 20 --vram-limit "$cap"
        run "sdxl-$cap-nf4-te-tiling" -m builtin:sdxl --size 1024x1024 --steps 20 \
          --vram-limit "$cap" --backend bitsandbytes --precision nf4 \
          --set components.quantize_text_encoders=always \
          --set 'force.memory_options=[vae_slicing,vae_tiling]'
      done ;;
    streams)
      materialize builtin:sdxl
      run sdxl-10GB-bf16-streams -m builtin:sdxl --size 1024x1024 --steps 20 --vram-limit 10GB \
        --backend none --precision bf16 \
        --set 'force.memory_options=[vae_slicing,vae_tiling,group_offload_streams]'
      run sdxl-4GB-torchao-streams -m builtin:sdxl --size 1024x1024 --steps 20 --vram-limit 4GB \
        --backend torchao --precision int8 --set components.quantize_text_encoders=always \
        --set 'force.memory_options=[vae_slicing,vae_tiling,group_offload_streams]' ;;
    cpu-te)  # text encoders on the host's CPU (components.cpu_text_encoders=auto)
      grep -m1 "model name" /proc/cpuinfo >> "$log"
      echo "cores $(nproc), bf16 units: $(grep -o -w -m1 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" >> "$log"
      materialize builtin:sdxl
      run sdxl-4GB-cpu-te -m builtin:sdxl --size 1024x1024 --steps 20 --vram-limit 4GB \
        --set components.cpu_text_encoders=auto
      materialize builtin:flux-dev
      for cap in ${GPU_SPEED_FLUX_CAPS:-10GB}; do
        run "flux-$cap-cpu-te" -m builtin:flux-dev --size 1024x1024 --steps 20 --vram-limit "$cap" \
          --set components.cpu_text_encoders=auto
      done ;;
    final)  # the choices of the code as committed, where they changed after the runs above
      materialize builtin:flux-dev
      run flux-10GB-final -m builtin:flux-dev --size 1024x1024 --steps 20 --vram-limit 10GB
      materialize builtin:sdxl
      run sdxl-6GB-final -m builtin:sdxl --size 1024x1024 --steps 20 --vram-limit 6GB ;;
    *) step "unknown suite $suite" ;;
  esac
done
step summary
python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | chosen | tried before | predicted s | measured s | ratio | step s | load s | peak GB | est. peak GB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("*.json")):
    if path.name == "bandwidth.json":
        continue
    try:
        r = json.loads(path.read_text())
    except ValueError:
        print(f"| {path.stem} | failed (see gpu_speed.log) | | | | | | | | |")
        continue
    m, e, g, p = r["measured"], r["estimate"], r.get("generation", {}), r.get("predicted") or {}
    tried = "; ".join(f"{a['label']}: {a['outcome']} {a.get('error') or ''}".strip() for a in r["tried"][:-1]) or "–"
    gb = lambda v: f"{v / 1e9:.2f}" if v else "–"
    sec = lambda v: f"{v:.2f}" if v else "–"
    ratio = f"{g['seconds'] / p['seconds']:.2f}" if p.get("seconds") and g.get("seconds") else "–"
    print(f"| {path.stem} | {r['chosen']['label']} | {tried} | {sec(p.get('seconds'))} | {sec(g.get('seconds'))} "
          f"| {ratio} | {sec(g.get('step_seconds'))} | {sec(m.get('load_seconds'))} | {gb(m.get('peak_bytes'))} | {gb(e.get('peak_bytes'))} |")
PY
# At most 8 files come back from the device: the reports travel as one archive.
(cd "$out" && ls ./*.json > /dev/null 2>&1 && tar -czf results.tar.gz ./*.json && rm -f ./*.json)
step done
