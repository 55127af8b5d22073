"""Cold against warm compiles of a denoiser, each in a fresh process, through the executor's own
compile step (autoquant/execute/compile.py):

- eager:       no compile (the step time compiled ones are compared with);
- cold:        an empty inductor cache; the artifacts it compiled are saved (save_artifacts);
- warm-artifacts: another empty inductor cache, with the saved artifacts loaded first
               (what autoquant's cache brings to a new machine, container or cleared /tmp);
- warm-local:  the cold run's own inductor cache, no artifacts (torch's cache in /tmp alone).

The compile seconds of a run are its first generation's seconds less the eager one's.

    python scripts/compile_cache.py [-m builtin:tiny-sd ...] [--size 64] [--steps 2]
        [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--out DIR]

Prints a table and writes DIR/compile-cache.json (default docs/runs/compile-cache-cpu/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("eager", "cold", "warm-artifacts", "warm-local")


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: build, (load, compile), two generations; JSON out."""
    import torch

    from autoquant import models
    from autoquant.backends import UNQUANTIZED
    from autoquant.backends.base import torch_dtype
    from autoquant.bench import TierSpec
    from autoquant.execute.compile import compile_denoiser, load_artifacts, save_artifacts
    from autoquant.planner.latency import compile_figure

    torch.manual_seed(0)
    from diffusers import DiffusionPipeline

    source = models.resolve(args.model)
    folder = models.materialize(source, progress=False)
    inventory = models.inventory(source)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype(args.dtype))
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    artifacts = Path(args.artifacts)
    loaded = load_artifacts(artifacts) if args.child == "warm-artifacts" else False
    how = None
    if args.child != "eager":
        # Compiled as the executor compiles this format (its figure's scope and mode).
        tier = TierSpec(UNQUANTIZED, args.dtype).tier(inventory, args.dtype)
        figure = compile_figure(
            inventory, tier, on_gpu=args.device.startswith("cuda"), nearest=True
        )
        assert figure is not None  # nearest always gives one
        denoiser = getattr(pipe, inventory.denoiser.name)
        how = compile_denoiser(denoiser, scope=figure.scope, mode=figure.mode)

    def generate() -> float:
        started = time.perf_counter()
        pipe(
            prompt="a photo of an astronaut riding a horse on the moon",
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(0),
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    first = generate()
    second = generate()
    saved = save_artifacts(artifacts) if args.child == "cold" else False
    print(
        json.dumps(
            {
                "mode": args.child,
                "compiled": how,
                "artifacts_loaded": loaded,
                "artifacts_saved": saved,
                "artifact_bytes": artifacts.stat().st_size if artifacts.is_file() else None,
                "first_generation_seconds": first,
                "second_generation_seconds": second,
            }
        )
    )


def measure(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    artifacts = work / f"{model.replace(':', '-').replace('/', '-')}.bin"
    runs: dict[str, Any] = {}
    for mode in MODES:
        inductor = work / ("inductor-cold" if mode in ("cold", "warm-local") else f"i-{mode}")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
        command = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "-m",
            model,
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--artifacts",
            str(artifacts),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{model} {mode} failed:\n{done.stderr[-3000:]}")
        runs[mode] = {**json.loads(done.stdout.strip().splitlines()[-1])}
        runs[mode]["process_seconds"] = time.perf_counter() - started
    eager = runs["eager"]["first_generation_seconds"]
    for mode in MODES[1:]:
        runs[mode]["compile_seconds"] = runs[mode]["first_generation_seconds"] - eager
    cold = runs["cold"]["compile_seconds"]
    for mode in ("warm-artifacts", "warm-local"):
        runs[mode]["share_of_cold"] = runs[mode]["compile_seconds"] / cold if cold > 0 else None
    return {"model": model, "runs": runs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", action="append", default=[])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--out", type=Path, default=Path("docs/runs/compile-cache-cpu"))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.model = args.model or ["builtin:tiny-sd"]
    if args.child:
        args.model = args.model[0]
        child(args)
        return 0
    import torch

    from autoquant.core.fsutil import write_text_atomic

    results = []
    with tempfile.TemporaryDirectory(prefix="aq-compile-") as work:
        for model in args.model:
            results.append(measure(args, model, Path(work)))
    print(f"{'model':<20} {'mode':<15} {'first gen s':>11} {'2nd gen s':>9} {'compile s':>9} share")
    for result in results:
        for mode, run in result["runs"].items():
            share = run.get("share_of_cold")
            print(
                f"{result['model']:<20} {mode:<15} {run['first_generation_seconds']:>11.2f} "
                f"{run['second_generation_seconds']:>9.3f} "
                f"{run.get('compile_seconds', 0.0):>9.2f} "
                f"{'' if share is None else f'{share:.2f}'}"
            )
    report = {
        "script": "scripts/compile_cache.py",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "request": {"size": args.size, "steps": args.steps, "dtype": args.dtype},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "compile-cache.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'compile-cache.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
