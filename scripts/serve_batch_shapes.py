"""A compiled plan's calls of 1-8 images: one graph with a dynamic batch dimension (what a
compiled `autoquant serve` runs, docs/serving.md "Compiled plans") against a static graph per
image count, and what padding each call up to a power-of-two bucket of static graphs would cost.
Each way in its own process; per call, the least seconds of 7 calls interleaved across counts
(a shared machine's noise falls on every count alike).

    python scripts/serve_batch_shapes.py [-m builtin:tiny-sd] [--device cpu] [--steps 10]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

COUNTS = (1, 2, 3, 4, 5, 8)
ROUNDS = 7


def child(args: argparse.Namespace) -> None:
    import torch

    if args.child == "static":
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = 64
    from autoquant.execute.tuning import TuneOptions, tune

    result = tune(
        TuneOptions(
            model=args.model, device=args.device, compile="always", progress=False, retune=True
        ),
        log=lambda _line: None,
    )
    pipe = result.pipeline
    pipe.set_progress_bar_config(disable=True)
    side = result.inventory.default_size

    def call(images: int) -> float:
        started = time.perf_counter()
        pipe(
            prompt=["a photo of an astronaut"] * images,
            num_inference_steps=args.steps,
            width=side,
            height=side,
            generator=[torch.Generator().manual_seed(i) for i in range(images)],
        )
        return time.perf_counter() - started

    for images in COUNTS:  # the first call of each count compiles what it needs
        call(images)
    seconds: dict[int, list[float]] = {n: [] for n in COUNTS}
    for _ in range(ROUNDS):
        for images in COUNTS:
            seconds[images].append(call(images))
    print(json.dumps({n: min(s) for n, s in seconds.items()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="builtin:tiny-sd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", choices=("static", "dynamic"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    runs: dict[str, dict[int, float]] = {}
    for way in ("dynamic", "static"):
        command = [sys.executable, __file__, "--child", way, "-m", args.model]
        command += ["--device", args.device, "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{way} failed:\n{done.stderr[-3000:]}")
        runs[way] = {int(n): s for n, s in json.loads(done.stdout.splitlines()[-1]).items()}

    def bucket(images: int) -> int:
        return 1 << (images - 1).bit_length()

    padded = {n: runs["static"][bucket(n)] for n in COUNTS if bucket(n) in runs["static"]}
    print(f"{args.model} on {args.device}, {args.steps} steps, seconds a call (least of {ROUNDS})")
    print()
    print("| images a call | " + " | ".join(str(n) for n in COUNTS) + " |")
    print("|---|" + "---:|" * len(COUNTS))
    rows = (
        ("dynamic batch, as it is", runs["dynamic"]),
        ("a static graph per count", runs["static"]),
        ("padded to a power-of-two bucket", padded),
    )
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{row[n]:.3f}" for n in COUNTS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
