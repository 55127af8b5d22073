"""A real CPU out-of-memory inside the serve worker's batch, run as a child process by
tests/test_serve.py: address space capped with RLIMIT_AS so that one image fits and a batch of
eight does not; the worker must halve the batch until it fits and answer every request.

Run it with MALLOC_MMAP_THRESHOLD_ set (the test does): glibc then maps every large block on
its own and unmaps it when freed, so the address space goes back to where it was after each
call and a cap above it means the same thing every time (with its default, adaptive threshold
freed blocks stay mapped and the same cap lets eight images through or not, by history).

Prints one JSON line: the images each request got, the worker's /metrics text, what it logged.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from typing import Any

import torch

from autoquant.execute import memory
from autoquant.execute.tuning import TuneOptions
from autoquant.serve.metrics import Metrics
from autoquant.serve.schema import Generation
from autoquant.serve.worker import READY, Worker, WorkerSettings

SIDE = 256  # tiny-sd's activations at 256² are large enough for the cap to tell 1 from 8 images
REQUESTS = 8
MiB = 2**20
# Address space above the current size to try, smallest first, for one image to fit. Measured
# with torch 2.13 (CPU) at 256²: one image needs ~40 MiB more, two ~60, four ~100, eight ~180.
HEADROOMS_MIB = (20, 30, 40, 50, 60, 80, 100)
MARGIN_MIB = 40  # above the first cap one image fits under: room for two, not for eight


def address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def cap(limit: int) -> None:
    # Only the soft limit: the hard one stays unlimited, so the cap can be raised again.
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def images(pipe: Any, count: int, steps: int = 2) -> None:
    generators = [torch.Generator().manual_seed(0)] * count
    prompts = ["calibration"] * count
    pipe(prompt=prompts, num_inference_steps=steps, width=SIDE, height=SIDE, generator=generators)


def warm_up(pipe: Any) -> None:
    """Run every batch shape the halving can reach once, uncapped. oneDNN creates a primitive
    per shape, and creating one under the cap fails as "could not create a primitive" rather
    than as the allocator's out-of-memory; the split path's memory.free() is warmed too."""
    count = REQUESTS
    while count >= 1:
        images(pipe, count, steps=1)
        count //= 2
    memory.free("cpu")


def calibrate(pipe: Any) -> int:
    """The smallest cap (plus the margin) under which one image is generated."""
    for headroom in HEADROOMS_MIB:
        limit = address_space() + headroom * MiB
        cap(limit)
        try:
            images(pipe, 1)
        except RuntimeError as err:
            if "can't allocate memory" not in str(err):
                raise
            continue
        return limit + MARGIN_MIB * MiB
    raise RuntimeError(f"one {SIDE}² image did not fit in {HEADROOMS_MIB[-1]} MiB more")


def main() -> int:
    torch.set_num_threads(1)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    serve_log = logging.getLogger("autoquant.serve")
    serve_log.setLevel(logging.INFO)
    serve_log.addHandler(Collect())
    # A long window: the eight requests below join one batch however slowly they arrive.
    settings = WorkerSettings(max_batch=REQUESTS, batch_window=10.0)
    worker = Worker(TuneOptions(device="cpu", progress=False), settings, Metrics())
    worker.start()
    deadline = time.monotonic() + 300
    while worker.state != READY:
        if worker.error is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker not ready: {worker.state} {worker.error}")
        time.sleep(0.1)
    pipe = worker._result.pipeline  # type: ignore[union-attr]  # calibration only; it is idle
    warm_up(pipe)
    limit = calibrate(pipe)
    cap(limit)
    futures = [
        worker.submit(Generation(f"prompt {i}", None, SIDE, SIDE, 2, None, seed=i, n=1))
        for i in range(REQUESTS)
    ]
    counts = [len(future.result(timeout=300)) for future in futures]
    cap(resource.RLIM_INFINITY)
    worker.close()
    print(json.dumps({"images": counts, "metrics": worker.metrics.render({}), "log": lines}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
