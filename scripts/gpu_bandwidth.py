"""Host↔device copy rates on this machine's first GPU, the figures the latency model's transfer
terms stand on (profiles/latency.yaml `gpu.transfers`): host→device from pinned and from
pageable memory, and device→host into freshly allocated pageable memory (what moving a module
back to the CPU does under model CPU offload) and into a reused pinned buffer.

    python3 scripts/gpu_bandwidth.py OUT.json [GiB]

Each rate is the best of 3 copies of one GiB-sized tensor (4 GiB by default).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def best_gb_s(size_bytes: int, copy: Callable[[], object]) -> float:
    seconds = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return size_bytes / min(seconds) / 1e9


def main() -> None:
    out = Path(sys.argv[1])
    gib = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    count = gib * 2**30 // 2
    pageable = torch.ones(count, dtype=torch.bfloat16)
    pinned = pageable.pin_memory()
    pinned_back = torch.empty_like(pinned).pin_memory()
    device = pageable.to("cuda")
    size = count * 2
    rates = {
        "h2d_pinned_gb_s": best_gb_s(size, lambda: pinned.to("cuda", non_blocking=True)),
        "h2d_pageable_gb_s": best_gb_s(size, lambda: pageable.to("cuda")),
        "d2h_fresh_pageable_gb_s": best_gb_s(size, lambda: device.to("cpu")),
        "d2h_pinned_gb_s": best_gb_s(size, lambda: pinned_back.copy_(device, non_blocking=True)),
    }
    row = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "tensor_gib": gib,
        **{k: round(v, 2) for k, v in rates.items()},
    }
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
