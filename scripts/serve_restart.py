"""A compiled server's start on a fresh machine, first and again: what autoquant's compile cache
saves a restart (issue "The fast path on big cards", item 3).

    python scripts/serve_restart.py --out DIR [--starts 2] [--ready-timeout 900] [--force]
        [--server-args "--model builtin:tiny-sd --device cpu --compile always --max-batch 4"]

Starts `autoquant serve` (scripts/loadtest.py's spawned server) --starts times in a row with one
AUTOQUANT_CACHE_DIR, empty before the first, and each time an empty inductor cache of its own
(TORCHINDUCTOR_CACHE_DIR: a new machine's or container's /tmp), so that all a start can reuse is
what autoquant saved: the tuning entry, and the compile cache with the smoke test's and the
warm-up's graphs. Each start is timed until /health says ready, and /report gives the tuning's
compile seconds and whether its compile cache was warm, and the warm-up's seconds, graphs and
inductor cache hits and misses. The model is materialized once before, untimed, into the same
cache. The machine is left as it is (OMP_NUM_THREADS too).

Writes DIR/serve-restart.json and DIR/serve-restart.md (a table). Exits 2 if DIR already holds
them (unless --force).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from loadtest import spawned_server

RESULT_JSON = "serve-restart.json"
RESULT_MD = "serve-restart.md"
DEFAULT_SERVER_ARGS = "--model builtin:tiny-sd --device cpu --compile always --max-batch 4"


def start_once(
    server_args: list[str], cache: Path, inductor: Path, timeout: float
) -> dict[str, Any]:
    env = {"AUTOQUANT_CACHE_DIR": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    started = time.perf_counter()
    with spawned_server(server_args, timeout, env=env) as url:
        ready = time.perf_counter() - started
        report = httpx.get(f"{url}/report", timeout=30).json()
    measured, shapes = report["measured"], report.get("shapes") or {}
    return {
        "ready_seconds": round(ready, 1),
        "tier": report["chosen"]["label"],
        "device": measured["device"],
        "tuning_compile_seconds": measured.get("compile_seconds"),
        "tuning_compile_cache_warm": measured.get("compile_cache_warm"),
        "tuning_cache_hit": (report.get("cache") or {}).get("hit"),
        "warmup_seconds": shapes.get("warmup_seconds"),
        "warmup_compiles": shapes.get("warmup_compiles"),
        "warmup_compile_cache": shapes.get("warmup_compile_cache"),
        "most_images": shapes.get("most_images"),
        "sizes": shapes.get("sizes"),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# A compiled server's start, first and again with autoquant's cache",
        "",
        f"- machine: {result['host']['machine']}; torch {result['host']['torch']}",
        f"- server: `autoquant serve {result['server_args']}`",
        f"- command: `{result['command']}`",
        "- every start: an empty inductor cache of its own; the first also an empty autoquant "
        "cache, the later ones the first's",
        "",
        "| start | ready s | tier | tuning compile s (cache) | warm-up s | warm-up graphs | "
        "inductor cache hits | misses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, start in enumerate(result["starts"], 1):
        lookups = start["warmup_compile_cache"] or {}
        compile_s = start["tuning_compile_seconds"]
        warm = "warm" if start["tuning_compile_cache_warm"] else "cold"
        lines.append(
            f"| {index} | {start['ready_seconds']} | {start['tier']} | "
            f"{'–' if compile_s is None else f'{compile_s:.1f}'} ({warm}) | "
            f"{start['warmup_seconds']} | {start['warmup_compiles']} | "
            f"{lookups.get('hits', '–')} | {lookups.get('misses', '–')} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    """This machine in words: its GPU if it has one, and its CPU."""
    from autoquant.planner.latency import cpu_kind
    from autoquant.probe import probe

    profile = probe()
    cpu = f"{profile.cpu.model}, {profile.cpu.cores} cores ({cpu_kind(profile.cpu)})"
    gpu = profile.primary_gpu
    return f"{gpu.name}; host {cpu}" if profile.has_gpu and gpu else cpu


def materialize(model: str, device: str, cache: Path) -> None:
    """The model's files in ``cache``, before any start is timed (a built-in model's random
    weights made on ``device``: a GPU makes Flux-class ones in a minute)."""
    code = "import sys; from autoquant import models; "
    code += "models.materialize(models.resolve(sys.argv[1]), progress=False, device=sys.argv[2])"
    env = {**os.environ, "AUTOQUANT_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-c", code, model, device], env=env, check=True)


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args[:-1] else default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--server-args", default=DEFAULT_SERVER_ARGS)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.starts < 2:
        parser.error("--starts: at least 2 (a first start and a restart)")
    if (args.out / RESULT_JSON).exists() and not args.force:
        print(f"{args.out / RESULT_JSON} exists: pass --force to replace it", file=sys.stderr)
        raise SystemExit(2)
    server_args = shlex.split(args.server_args)
    model = _flag(server_args, "--model", "")
    if not model:
        parser.error("--server-args: name the model (--model ...)")
    import torch

    with tempfile.TemporaryDirectory(prefix="serve-restart-") as work:
        cache = Path(work) / "autoquant-cache"
        materialize(model, _flag(server_args, "--device", "cpu"), cache)
        starts = []
        for index in range(args.starts):
            inductor = Path(work) / f"inductor-{index}"
            start = start_once(server_args, cache, inductor, args.ready_timeout)
            print(f"start {index + 1}: {json.dumps(start)}", file=sys.stderr, flush=True)
            starts.append(start)
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "server_args": args.server_args,
        "host": {"machine": machine(), "torch": torch.__version__},
        "starts": starts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULT_JSON).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / RESULT_MD).write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
