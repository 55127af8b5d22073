"""How long planning takes once imports are done (issue: under 1 s).

    python scripts/bench_plan.py [--repeats N]

Prints a Markdown table: per model and machine, the first plan() (inventory from the cache or
the meta device) and the median of N repeated plan() calls, with the hardware named.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from autoquant.models import inventory, resolve
from autoquant.planner import load_settings, plan
from autoquant.probe import probe

MACHINES = {
    "cpu": {"device": "cpu"},
    "cuda 8GB": {"device": "cuda", "vram": 8 * 10**9},
    "cuda 16GB": {"device": "cuda", "vram": 16 * 10**9},
    "cuda 80GB": {"device": "cuda", "vram": 80 * 10**9},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    settings = load_settings()
    host = probe()
    print(f"host: {host.cpu.model}, {host.cpu.cores} cores, {platform.python_version()}")
    print("| model | machine | first inventory s | plan ms (median of N) | chosen |")
    print("|---|---|---|---|---|")
    for model in ("builtin:tiny-sd", "builtin:sdxl", "builtin:flux-dev"):
        started = time.perf_counter()
        inv = inventory(resolve(model))
        first = time.perf_counter() - started
        for label, machine in MACHINES.items():
            profile = probe(**machine)  # type: ignore[arg-type]
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = plan(profile, inv, settings)
                times.append(time.perf_counter() - started)
            print(
                f"| {model} | {label} | {first:.3f} | {statistics.median(times) * 1000:.1f} | "
                f"{result.chosen.label} |"
            )


if __name__ == "__main__":
    main()
