"""The one thread that owns the pipeline: it tunes, then runs queued requests in batches.

Requests wait in a bounded FIFO. The worker takes the oldest one and, for a short window, lets
later requests with the same batch key join it, up to the number of images that fit in the
memory free right now (measured per batch from the smoke test's per-image peak). A batch that
runs out of memory anyway is halved and retried; a single request that still does not fit goes
through :func:`autoquant.execute.recover.generate`, which turns on memory remedies and moves
down the tier ladder.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoquant.core.errors import error_line
from autoquant.core.units import format_bytes
from autoquant.execute import memory
from autoquant.execute.tuning import TuneOptions, tune
from autoquant.serve.metrics import Metrics
from autoquant.serve.schema import Generation

if TYPE_CHECKING:
    from PIL.Image import Image

    from autoquant.execute.ladder import Result

logger = logging.getLogger("autoquant.serve")

# Share of the free memory a batch may plan to use: the rest absorbs estimate error and
# allocator fragmentation (an OOM is recovered from, but costs a whole wasted call).
MEMORY_HEADROOM = 0.8

TUNING, READY, DRAINING, STOPPED, FAILED = "tuning", "ready", "draining", "stopped", "failed"


@dataclass(frozen=True)
class WorkerSettings:
    max_batch: int = 8  # images per pipeline call, at most (1: batching off)
    queue_size: int = 32  # requests waiting (not yet running), at most
    batch_window: float = 0.02  # seconds the oldest request waits for others to join it
    vram_limit_bytes: int | None = None  # --vram-limit: the memory this process may use


class QueueFullError(Exception):
    """The queue holds ``queue_size`` requests already."""


class NotAcceptingError(Exception):
    """The worker is tuning, draining or stopped; ``state`` says which."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


@dataclass
class Job:
    generation: Generation
    future: Future[list[Image]] = field(default_factory=Future)

    @property
    def image_count(self) -> int:
        return self.generation.n


def available_bytes(device: str, cap_bytes: int | None) -> int:
    """Memory a batch could use now: on CUDA what the driver reports free plus what PyTorch's
    cache holds unused (bounded by a --vram-limit cap); elsewhere the RAM psutil calls
    available."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        available = free + torch.cuda.memory_reserved(device) - allocated
        return min(available, cap_bytes - allocated) if cap_bytes else available
    import psutil

    return int(psutil.virtual_memory().available)


def images_that_fit(free_bytes: int, bytes_per_image: float, max_batch: int) -> int:
    """Images one call can hold: ``free_bytes`` (with headroom) over the per-image peak,
    clamped to [1, max_batch]. An unmeasured per-image peak (0) leaves only the clamp."""
    if bytes_per_image <= 0:
        return max_batch
    return max(1, min(max_batch, int(free_bytes * MEMORY_HEADROOM // bytes_per_image)))


def run_halving(
    jobs: list[Job],
    run_batch: Callable[[list[Job]], list[list[Image]]],
    run_single: Callable[[Job], list[Image]],
    device: str,
    metrics: Metrics,
) -> list[list[Image]]:
    """Each job's images. A batch that runs out of memory is split in halves and retried;
    a single job goes to ``run_single`` (the OOM-surviving path)."""
    if len(jobs) == 1:
        return [run_single(jobs[0])]
    try:
        return run_batch(jobs)
    except Exception as err:
        if not memory.is_oom(err):
            raise
    # Outside the except block: its traceback would keep the failed call's tensors alive.
    memory.free(device)
    metrics.oom_recovered()
    metrics.batch_split()
    half = len(jobs) // 2
    logger.warning("out of memory with %d requests in one call: splitting in halves", len(jobs))
    return run_halving(jobs[:half], run_batch, run_single, device, metrics) + run_halving(
        jobs[half:], run_batch, run_single, device, metrics
    )


def call_arguments(jobs: list[Job]) -> dict[str, Any]:
    """One pipeline call for jobs sharing a batch key: a prompt row per image, and per job one
    seeded generator repeated for its images, so each job's images are the ones it would get
    alone (diffusers draws each row's latents from its own list entry, in order)."""
    import torch

    first = jobs[0].generation
    prompts: list[str] = []
    negatives: list[str] = []
    generators: list[torch.Generator] = []
    for job in jobs:
        g = job.generation
        generator = torch.Generator().manual_seed(g.seed)
        prompts += [g.prompt] * g.n
        negatives += [g.negative_prompt or ""] * g.n
        generators += [generator] * g.n
    call: dict[str, Any] = {
        "prompt": prompts,
        "negative_prompt": None if first.negative_prompt is None else negatives,
        "num_inference_steps": first.steps,
        "width": first.width,
        "height": first.height,
        "generator": generators,
    }
    if first.guidance_scale is not None:
        call["guidance_scale"] = first.guidance_scale
    return call


def split_images(images: list[Image], jobs: list[Job]) -> list[list[Image]]:
    per_job, start = [], 0
    for job in jobs:
        per_job.append(images[start : start + job.image_count])
        start += job.image_count
    return per_job


class Worker:
    """Tunes ``options`` on its own thread, then serves submitted generations until closed."""

    def __init__(
        self,
        options: TuneOptions,
        settings: WorkerSettings,
        metrics: Metrics,
        on_failure: Callable[[BaseException], None] = lambda _err: None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.error: BaseException | None = None
        self.report: dict[str, Any] | None = None  # a snapshot; the worker owns the Result
        self.default_size: tuple[int, int] = (0, 0)
        self.last_limit = 0  # images per call allowed for the latest batch
        self._options = options
        self._on_failure = on_failure
        self._result: Result | None = None
        self._bytes_per_pixel = 0.0
        self._state = TUNING
        self._closed = False
        self._jobs: deque[Job] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name="autoquant-worker", daemon=True)

    # -- the server's side --------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def running(self) -> int:
        with self._cond:
            return self._running

    def start(self) -> None:
        self._thread.start()

    def submit(self, generation: Generation) -> Future[list[Image]]:
        with self._cond:
            if self._state != READY:
                raise NotAcceptingError(self._state)
            if len(self._jobs) >= self.settings.queue_size:
                raise QueueFullError
            job = Job(generation)
            self._jobs.append(job)
            self._cond.notify_all()
        return job.future

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; queued ones still run. Safe from a signal handler
        on the event loop's thread: the condition's lock is reentrant, so interrupting submit()
        there cannot deadlock."""
        with self._cond:
            if self._state in (TUNING, READY):
                self._state = DRAINING
            self._cond.notify_all()

    def close(self) -> None:
        """Finish the queue, then stop the thread and wait for it."""
        self.stop_accepting()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- the worker thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._tune()
        except BaseException as err:  # reported to the server, which exits with it
            logger.error("tuning failed: %s", error_line(err))
            self.error = err
            with self._cond:
                self._state = FAILED
            self._on_failure(err)
            return
        while (batch := self._next_batch()) is not None:
            self._serve(batch)
        with self._cond:
            self._state = STOPPED

    def _tune(self) -> None:
        started = time.perf_counter()
        result = tune(self._options, log=lambda line: logger.info(line.strip()))
        _quiet(result.pipeline)
        self._result = result
        self.report = json_ready(result.report())
        request = result.plan.request
        self.default_size = (request.width, request.height)
        self._bytes_per_pixel = self._measured_bytes_per_pixel(result)
        logger.info(summary(self.report, time.perf_counter() - started))
        free = available_bytes(result.plan.device, self.settings.vram_limit_bytes)
        fit = images_that_fit(
            free, self._bytes_per_pixel * request.width * request.height, self.settings.max_batch
        )
        logger.info(
            "batches of up to %d images at %dx%d (--max-batch %d, %s free, %s per image)",
            fit,
            request.width,
            request.height,
            self.settings.max_batch,
            format_bytes(free),
            format_bytes(self._bytes_per_pixel * request.width * request.height),
        )
        with self._cond:
            if self._state == TUNING:
                self._state = READY

    def _measured_bytes_per_pixel(self, result: Result) -> float:
        """The smoke test's peak above the weights, per image pixel. The smoke size is not in
        the Result, so it is worked out from the options the way tune() does."""
        attempt = result.attempts[-1]
        if attempt.peak_bytes is None or attempt.weights_bytes is None:
            return 0.0
        width = self._options.smoke_size or result.plan.request.width
        height = self._options.smoke_size or result.plan.request.height
        return max(0, attempt.peak_bytes - attempt.weights_bytes) / (width * height)

    def _images_allowed(self, generation: Generation) -> int:
        if self.settings.max_batch == 1:
            return 1
        assert self._result is not None
        free = available_bytes(self._result.plan.device, self.settings.vram_limit_bytes)
        per_image = self._bytes_per_pixel * generation.width * generation.height
        return images_that_fit(free, per_image, self.settings.max_batch)

    def _matching(self, key: tuple[Any, ...], limit: int) -> tuple[list[Job], bool]:
        """Queued jobs with ``key``, oldest first, while their images fit ``limit`` (the oldest
        always runs, even alone over the limit). Returns them and whether the batch is full."""
        batch: list[Job] = []
        images = 0
        for job in self._jobs:
            if job.generation.batch_key != key:
                continue
            if batch and images + job.image_count > limit:
                return batch, True
            batch.append(job)
            images += job.image_count
        return batch, images >= limit

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._jobs[0].generation
            limit = self.last_limit = self._images_allowed(head)
            deadline = time.monotonic() + self.settings.batch_window
            while True:
                batch, full = self._matching(head.batch_key, limit)
                remaining = deadline - time.monotonic()
                if full or remaining <= 0 or self._state != READY:
                    break
                self._cond.wait(remaining)
            for job in batch:
                self._jobs.remove(job)
            self._running = len(batch)
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _serve(self, batch: list[Job]) -> None:
        if batch:
            assert self._result is not None
            run = self._run_batch, self._run_single
            try:
                outputs = run_halving(batch, *run, self._result.plan.device, self.metrics)
            except Exception as err:  # the batch's requests get it (a 500, or 507 for OOM)
                for job in batch:
                    job.future.set_exception(err)
            else:
                for job, images in zip(batch, outputs, strict=True):
                    job.future.set_result(images)
        with self._cond:
            self._running = 0

    def _run_batch(self, jobs: list[Job]) -> list[list[Image]]:
        assert self._result is not None
        from autoquant.execute.build import pipeline_call_kwargs

        pipe: Any = self._result.pipeline
        call = pipeline_call_kwargs(self._result.inventory, pipe, **call_arguments(jobs))
        output = pipe(**call)
        self.metrics.batch_ran(len(jobs), sum(job.image_count for job in jobs))
        return split_images(list(output.images), jobs)

    def _run_single(self, job: Job) -> list[Image]:
        assert self._result is not None
        from autoquant.execute.recover import generate

        result = self._result
        changes = len(result.adjustments)
        output = generate(result, _log_adjustment, **call_arguments([job]))
        if len(result.adjustments) > changes:  # remedies or a tier change: record and re-snapshot
            self.metrics.oom_recovered(len(result.adjustments) - changes)
            _quiet(result.pipeline)
            self.report = json_ready(result.report())
        self.metrics.batch_ran(1, job.image_count)
        return list(output.images)


def _quiet(pipe: Any) -> None:
    pipe.set_progress_bar_config(disable=True)  # a bar per request would flood the log


def _log_adjustment(line: str) -> None:
    logger.warning(line.strip())


def json_ready(report: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON values (it holds a few others, e.g. paths), as `run --json`
    prints it."""
    return dict(json.loads(json.dumps(report, default=str)))


def summary(report: dict[str, Any], seconds: float) -> str:
    """One line for the log: what was chosen and what it measured."""
    chosen, measured = report["chosen"], report["measured"]
    peak = measured["peak_bytes"]
    step = measured["step_seconds"]
    return (
        f"tuned {report['model']} in {seconds:.1f} s: {chosen['label']} on {measured['device']} "
        f"({chosen['description']}); peak {format_bytes(peak) if peak else 'n/a'}, "
        f"{f'{step:.3f} s/step' if step else 'n/a'}"
        + (f"; warnings: {'; '.join(report['warnings'])}" if report["warnings"] else "")
    )
