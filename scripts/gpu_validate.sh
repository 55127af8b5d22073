#!/usr/bin/env bash
# The whole product on a real card, after a change that touched every backend: each backend's
# forced tier end to end on builtin:tiny-sd (and NF4 with quantized text encoders on
# builtin:tiny-flux), then `autoquant run` on builtin:sdxl at 1024² under --vram-limit 10, 6
# and 4 GB (what the card emulation leaves the allocator; which tier; the generation's own step
# time against the smoke test's), and builtin:sd15 forced to fp32 under 2 GB (a real CUDA OOM,
# then the fallback in the same process). One JSON per run and a summary under OUT_DIR.
#
#   scripts/gpu_validate.sh OUT_DIR
#
# On the lent GPU (device tool), with the wheels from ../shared/device/fetch-wheels.sh carried
# in .whl/ and installed to /tmp/site first (see that script's header).
set -uo pipefail
out=${1:?usage: scripts/gpu_validate.sh OUT_DIR}
mkdir -p "$out"
export AUTOQUANT_CACHE_DIR=${AUTOQUANT_CACHE_DIR:-/tmp/autoquant-cache} PYTHONUNBUFFERED=1
log="$out/gpu_validate.log"
: > "$log"
aq() { python3 -m autoquant "$@"; }
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }
run() {  # run NAME ARGS...: one `autoquant run --json`, its report in OUT/NAME.json
  local name=$1
  shift
  step "run $name: $*"
  local started=$SECONDS
  aq run --json --out "/tmp/out-$name" "$@" > "$out/$name.json" 2>> "$log"
  echo "$name exit $? after $((SECONDS - started)) s" | tee -a "$log"
}

step probe
aq probe --json > "$out/probe.json" 2>> "$log"
for tier in none:bf16 bitsandbytes:nf4 bitsandbytes:int8 quanto:int8 torchao:int8 \
  torchao:float8 gguf:q8_0; do
  run "tiny-sd-${tier/:/-}" -m builtin:tiny-sd --steps 4 --backend "${tier%%:*}" \
    --precision "${tier##*:}"
done
run tiny-flux-bitsandbytes-nf4-te -m builtin:tiny-flux --steps 4 --backend bitsandbytes \
  --precision nf4 --set components.quantize_text_encoders=always --negative-prompt blurry
for cap in 10GB 6GB 4GB; do
  run "sdxl-$cap" -m builtin:sdxl --size 1024x1024 --steps 20 --vram-limit "$cap"
done
run sd15-fp32-2GB -m builtin:sd15 --size 512x512 --steps 4 --backend none --precision fp32 \
  --vram-limit 2GB
step summary
python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | exit | chosen | tried | smoke step s | generation step s | peak GB (scope) | est. peak GB |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("*.json")):
    if path.name == "probe.json":
        continue
    try:
        r = json.loads(path.read_text())
    except ValueError:
        print(f"| {path.stem} | failed | – | – | – | – | – | – |")
        continue
    m, e, g = r["measured"], r.get("estimate", {}), r.get("generation", {})
    tried = "; ".join(f"{a['label']}: {a['outcome']}" for a in r["tried"][:-1]) or "–"
    gb = lambda v: f"{v / 1e9:.2f}" if v else "–"
    sec = lambda v: f"{v:.3f}" if v else "–"
    print(f"| {path.stem} | 0 | {r['chosen']['label']} | {tried} | {sec(m.get('smoke_step_seconds'))} "
          f"| {sec(g.get('step_seconds'))} | {gb(m.get('peak_bytes'))} ({m.get('peak_scope')}) "
          f"| {gb(e.get('peak_bytes'))} |")
PY
step done
