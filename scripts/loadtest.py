"""Throughput and latency of `autoquant serve` at several concurrencies, batching on vs off.

    # against a server you started (loopback only):
    python scripts/loadtest.py --url http://127.0.0.1:8000
    # or start the server here, once with batching on and once off (--max-batch 1):
    python scripts/loadtest.py --spawn --batching both --server-args "--model builtin:tiny-sd"

Each concurrency level sends a fixed number of requests (--requests) or stops at --time-limit,
whichever comes first, after one warm-up request per server. Prints a Markdown table (JSON with
--json): throughput in images/s, p50/p95 latency of the 200 answers, the mean batch the server
ran and the graphs a compiled plan compiled after its warm-up (from its /metrics), with the
server's model, tier and device.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx


@dataclass
class Level:
    batching: str
    concurrency: int
    requests: int
    ok: int
    rejected: int  # 503: queue full
    errors: int
    seconds: float
    images_per_second: float
    p50_seconds: float
    p95_seconds: float
    mean_batch: float  # images per pipeline call, from the server's counters
    recompiles: int  # graphs a compiled plan compiled during the level (0: its warm-up held)


def loopback_url(text: str) -> str:
    host = urlsplit(text).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(f"{text!r}: only loopback servers (127.0.0.1, ::1)")
    return text.rstrip("/")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def counters(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, flags=re.MULTILINE)}


async def _level(url: str, body: dict[str, Any], concurrency: int, args: argparse.Namespace) -> Any:
    latencies: list[float] = []
    statuses: list[int] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + args.time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < args.requests and time.perf_counter() < deadline:
            issued += 1
            sent = time.perf_counter()
            try:
                status = (await client.post("/generate", json=body)).status_code
            except httpx.TransportError:
                status = 0
            statuses.append(status)
            if status == 200:
                latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return time.perf_counter() - started, statuses, latencies


def measure(url: str, batching: str, args: argparse.Namespace) -> list[Level]:
    body = {
        "prompt": args.prompt,
        "steps": args.steps,
        **({"width": args.width, "height": args.height} if args.width else {}),
    }
    levels = []
    with httpx.Client(base_url=url, timeout=args.time_limit) as client:
        client.post("/generate", json=body).raise_for_status()  # warm-up, not counted
        for concurrency in args.concurrency:
            before = counters(client)
            seconds, statuses, latencies = asyncio.run(_level(url, body, concurrency, args))
            after = counters(client)
            batches = after["autoquant_batches_total"] - before["autoquant_batches_total"]
            images = after["autoquant_images_total"] - before["autoquant_images_total"]
            levels.append(
                Level(
                    batching=batching,
                    concurrency=concurrency,
                    requests=len(statuses),
                    ok=statuses.count(200),
                    rejected=statuses.count(503),
                    errors=len(statuses) - statuses.count(200) - statuses.count(503),
                    seconds=round(seconds, 2),
                    images_per_second=round(statuses.count(200) / seconds, 3),
                    p50_seconds=round(percentile(latencies, 0.5), 3),
                    p95_seconds=round(percentile(latencies, 0.95), 3),
                    mean_batch=round(images / batches, 2) if batches else math.nan,
                    recompiles=int(
                        after["autoquant_recompiles_total"] - before["autoquant_recompiles_total"]
                    ),
                )
            )
            # As it goes, so that a run cut short still tells what it measured.
            print(f"measured: {json.dumps(asdict(levels[-1]))}", file=sys.stderr, flush=True)
    return levels


def server_info(url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as client:
        report = client.get("/report").json()
        metrics = counters(client)
        max_batch = metrics["autoquant_max_batch"]
    return {
        "model": report["model"],
        "tier": report["chosen"]["label"],
        "device": report["measured"]["device"],
        "batching": "off" if max_batch == 1 else "on",
        "max_batch": int(max_batch),
        "tuned_size": f"{report['plan']['request']['width']}x{report['plan']['request']['height']}",
        "compiled": bool(report["chosen"].get("compiled")),
        "warmup_seconds": metrics["autoquant_warmup_seconds"],
        "warmup_compiles": int(metrics["autoquant_warmup_compiles"]),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def spawned_server(
    server_args: list[str], ready_timeout: float, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`python -m autoquant serve` on a free loopback port until the block ends; ``env``:
    variables set besides this process's own."""
    port = _free_port()
    command = [sys.executable, "-m", "autoquant", "serve", *server_args]
    command += ["--host", "127.0.0.1", "--port", str(port)]  # last: they win over server_args
    print(f"starting: {shlex.join(command[1:])}", file=sys.stderr, flush=True)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready in {ready_timeout:.0f} s")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def markdown(info: list[dict[str, Any]], levels: list[Level], args: argparse.Namespace) -> str:
    size = f"{args.width}x{args.height}" if args.width else info[0]["tuned_size"]
    lines = [
        f"server: {info[0]['model']}, {info[0]['tier']} on {info[0]['device']}; "
        f"requests: {size} px, {args.steps} steps, "
        f"up to {args.requests} per level, {args.time_limit:.0f} s limit",
        *(
            f"compiled: warm-up {i['warmup_seconds']:.1f} s, {i['warmup_compiles']} graphs "
            f"(batching {i['batching']})"
            for i in info
            if i["compiled"]
        ),
        "",
        "| batching | concurrency | requests | ok | 503 | errors | s | images/s | p50 s | p95 s "
        "| mean batch | recompiles |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        row = asdict(level).values()
        lines.append("| " + " | ".join(str(value) for value in row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", type=loopback_url, default="http://127.0.0.1:8000")
    target.add_argument("--spawn", action="store_true", help="start the server here")
    parser.add_argument(
        "--batching",
        choices=("on", "off", "both"),
        default="both",
        help="with --spawn: the server's batching; off adds --max-batch 1 (default both)",
    )
    parser.add_argument(
        "--server-args", default="", help='with --spawn, e.g. "--model builtin:sdxl"'
    )
    parser.add_argument("--ready-timeout", type=float, default=1800, help="tuning may take long")
    parser.add_argument("--requests", type=int, default=48, help="per concurrency level")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per level")
    parser.add_argument(
        "--concurrency", type=lambda t: [int(c) for c in t.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, help="default: the size the server was tuned for")
    parser.add_argument("--height", type=int)
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    if (args.width is None) != (args.height is None):
        parser.error("give --width and --height together")
    return args


def main() -> None:
    args = parse_args()
    info: list[dict[str, Any]] = []
    levels: list[Level] = []
    if args.spawn:
        modes = ("on", "off") if args.batching == "both" else (args.batching,)
        for mode in modes:
            extra = ["--max-batch", "1"] if mode == "off" else []
            with spawned_server(shlex.split(args.server_args) + extra, args.ready_timeout) as url:
                info.append(server_info(url))
                print(f"server: {json.dumps(info[-1])}", file=sys.stderr, flush=True)
                levels += measure(url, info[-1]["batching"], args)
    else:
        info.append(server_info(args.url))
        levels += measure(args.url, info[-1]["batching"], args)
    if args.json:
        print(json.dumps({"servers": info, "levels": [asdict(level) for level in levels]}))
    else:
        print(markdown(info, levels, args))


if __name__ == "__main__":
    main()
