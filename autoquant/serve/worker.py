"""The one thread that owns the pipeline: it tunes, then runs queued requests in batches.

Requests wait in a bounded FIFO. The worker takes the oldest one and, for a short window, lets
later requests with the same batch key join it, up to the number of images that fit in the
memory free right now (measured per batch from the smoke test's per-image peak). A batch that
runs out of memory anyway is halved and retried; a single request that still does not fit goes
through :func:`autoquant.execute.recover.generate`, which turns on memory remedies and moves
down the tier ladder.

A request is bounded before it is queued (serve/admission.py) and stopped once nobody waits for
it: a queued one whose client left is dropped, and a running call whose clients all left (or
whose drain a second signal aborted) stops at its next denoising step.

A compiled plan keeps to the shapes it compiled (docs/serving.md, "Compiled plans"): every image
count a call may have is run at every served size before the server is ready, a request of
another size is refused, and the graphs torch compiles after that warm-up are counted as
recompiles.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoquant.core.errors import AutoquantError, error_line
from autoquant.core.units import format_bytes
from autoquant.execute import memory
from autoquant.execute.compile import save_artifacts
from autoquant.execute.tuning import TuneOptions, tune
from autoquant.serve.admission import DEFAULT_MAX_REQUEST_SECONDS, Admission, Refusal
from autoquant.serve.metrics import Metrics
from autoquant.serve.report import json_ready, private_locations, public_report
from autoquant.serve.schema import DEFAULT_STEPS, MAX_IMAGES, Generation

if TYPE_CHECKING:
    from PIL.Image import Image

    from autoquant.execute.ladder import Result

logger = logging.getLogger("autoquant.serve")

# Share of the free memory a batch may plan to use: the rest absorbs estimate error and
# allocator fragmentation (an OOM is recovered from, but costs a whole wasted call).
MEMORY_HEADROOM = 0.8

TUNING, READY, DRAINING, STOPPED, FAILED = "tuning", "ready", "draining", "stopped", "failed"

# Denoising steps of a warm-up call: every step calls the denoiser with the same shapes, and the
# first compiles them; the second runs what the first compiled.
WARMUP_STEPS = 2


@dataclass(frozen=True)
class WorkerSettings:
    max_batch: int = 8  # images per pipeline call, at most (1: batching off)
    queue_size: int = 32  # requests waiting (not yet running), at most
    batch_window: float = 0.02  # seconds the oldest request waits for others to join it
    vram_limit_bytes: int | None = None  # --vram-limit: the memory this process may use
    max_request_seconds: float = DEFAULT_MAX_REQUEST_SECONDS  # predicted work per request
    sizes: tuple[tuple[int, int], ...] = ()  # --sizes: served by a compiled plan besides --size

    def __post_init__(self) -> None:
        # The CLI bounds each flag; this catches a caller building settings itself (an infinite
        # window overflows Condition.wait and kills the thread, NaN never expires).
        if self.max_batch < 1 or self.queue_size < 1:
            raise ValueError("max_batch and queue_size must be 1 or more")
        for name in ("batch_window", "max_request_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds, 0 or more")


class QueueFullError(Exception):
    """The queue holds ``queue_size`` requests already."""


class NotAcceptingError(Exception):
    """The worker is tuning, draining, stopped or failed; ``state`` says which."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


class AbortedError(Exception):
    """A second signal aborted the drain before this request was answered."""


class CallStopped(Exception):
    """Raised at a denoising step to stop a call nobody waits for any more; the message says
    at which step and why."""


@dataclass
class Job:
    generation: Generation
    future: Future[list[Image]] = field(default_factory=Future)
    cancelled: bool = False  # its client left while it ran; set by the event loop's thread

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
        failure = error_line(err)
    # Outside the except block: its traceback would keep the failed call's tensors alive.
    memory.free(device, keep_compiled=True)  # the same tier runs the halves
    metrics.oom_recovered()
    metrics.batch_split()
    half = len(jobs) // 2
    logger.warning(
        "out of memory with %d requests in one call (%s): splitting in halves", len(jobs), failure
    )
    return run_halving(jobs[:half], run_batch, run_single, device, metrics) + run_halving(
        jobs[half:], run_batch, run_single, device, metrics
    )


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far: dynamo's own count,
    ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` (torch 2.13: one per graph it
    hands its backend, a recompile for new shapes included; torch._dynamo.reset() leaves it).
    Process-wide, so the worker reads it before and after."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_cache_lookups() -> tuple[int, int]:
    """Inductor's FX graph cache lookups in this process so far, (hits, misses): a hit is a
    graph's code loaded from the cache (a saved compile cache loaded into it included), a miss
    one inductor generated. Process-wide, so the worker reads it before and after."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"]), int(
        counters["inductor"]["fxgraph_cache_miss"]
    )


@dataclass(frozen=True)
class Shapes:
    """What a compiled plan's warm-up ran: calls of 1 to ``most_images`` images at each of
    ``sizes``; the graphs torch compiled, inductor's cache lookups for them (``cache_hits``:
    code loaded, ``cache_misses``: code generated) and the seconds it took."""

    most_images: int
    sizes: tuple[tuple[int, int], ...]
    compiles: int
    seconds: float
    cache_hits: int
    cache_misses: int

    def size_names(self) -> list[str]:
        return [f"{width}x{height}" for width, height in self.sizes]


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
        self.failed_in_tuning = False
        self.report: dict[str, Any] | None = None  # a snapshot; the worker owns the Result
        self.admission: Admission | None = None  # replaced whole, never changed in place
        self.default_size: tuple[int, int] = (0, 0)
        self.last_limit = 0  # images per call allowed for the latest batch
        self.shapes: Shapes | None = None  # a compiled plan's warm-up, once it has run
        self.aborted_by: int | None = None  # the signal that aborted the drain
        self.aborted_requests = 0  # queued requests that abort answered unrun
        self._options = options
        self._on_failure = on_failure
        self._result: Result | None = None
        self._bytes_per_pixel = 0.0
        self._step: tuple[float, tuple[int, int]] = (0.0, (1, 1))  # seconds a step, at a size
        self._graphs_seen = 0  # compiled_graphs() after the latest call (compiled plans)
        self._state = TUNING
        self._closed = False
        self._jobs: deque[Job] = deque()
        self._current: list[Job] = []  # the running batch
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
            return len(self._current)

    def start(self) -> None:
        self._thread.start()

    def refusal(self, generation: Generation) -> Refusal | None:
        """Why ``generation`` cannot be served here (too much memory or time, or a size a
        compiled plan did not warm up), or None."""
        shapes = self.compiled_shapes()
        if shapes is not None and (generation.width, generation.height) not in shapes.sizes:
            return Refusal(
                422,
                f"{generation.width}x{generation.height}: this server runs a compiled plan and "
                f"serves only the sizes it compiled, {', '.join(shapes.size_names())} (another "
                "would stall the queue behind a compile): ask for one of them, or start it "
                "with --sizes",
            )
        admission = self.admission
        return admission.refusal(generation) if admission is not None else None

    def compiled_shapes(self) -> Shapes | None:
        """The warm-up's shapes while the tier serving is compiled; None for an eager one (and
        after recovery moved to an eager tier: it runs any shape without compiling)."""
        result = self._result
        return self.shapes if result is not None and result.chosen.tier.compiled else None

    def shapes_report(self) -> dict[str, Any] | None:
        """The warm-up and the recompiles since, for /report; None when there was none."""
        shapes = self.shapes
        if shapes is None:
            return None
        return {
            "most_images": shapes.most_images,
            "sizes": shapes.size_names(),
            "warmup_compiles": shapes.compiles,
            "warmup_compile_cache": {"hits": shapes.cache_hits, "misses": shapes.cache_misses},
            "warmup_seconds": round(shapes.seconds, 3),
            "recompiles": self.metrics.recompiles(),
        }

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

    def cancel(self, future: Future[list[Image]]) -> None:
        """The client of ``future``'s request left: drop it from the queue, or mark it so that
        its call stops at the next step once none of the call's requests has a client."""
        with self._cond:
            for job in self._jobs:
                if job.future is future:
                    self._jobs.remove(job)
                    self.metrics.cancelled("queued")
                    return
            for job in self._current:
                if job.future is future and not job.cancelled:
                    job.cancelled = True
                    self.metrics.cancelled("running")

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; queued ones still run. Safe from a signal handler
        on the event loop's thread: the condition's lock is reentrant, so interrupting submit()
        there cannot deadlock."""
        with self._cond:
            if self._state in (TUNING, READY):
                self._state = DRAINING
            self._cond.notify_all()

    def abort(self, sig: int) -> None:
        """Give up the drain (a second signal): the running call stops at its next step and
        every request still waiting is answered unrun. Only flags it, like stop_accepting(),
        so it is as safe from a signal handler; the worker thread answers the requests."""
        with self._cond:
            if self.aborted_by is None:
                self.aborted_by = sig
            if self._state in (TUNING, READY):
                self._state = DRAINING
            self._cond.notify_all()

    def close(self) -> None:
        """Finish the queue (unless aborted), then stop the thread and wait for it."""
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
            self.failed_in_tuning = True
            self._fail(err)
            return
        try:
            while (batch := self._next_batch()) is not None:
                self._serve(batch)
        except BaseException as err:  # a bug: nothing would answer the queue any more
            logger.error("the worker thread stopped: %s", error_line(err), exc_info=err)
            self._fail(err)
            return
        with self._cond:
            self._state = STOPPED

    def _fail(self, err: BaseException) -> None:
        """Stop for good: every request still waiting is answered 503, and the server is told
        (it exits non-zero)."""
        self.error = err
        with self._cond:
            self._state = FAILED
            waiting = [*self._current, *self._jobs]
            self._jobs.clear()
        for job in waiting:
            _settle(job, error=NotAcceptingError(FAILED))
        self._on_failure(err)

    def _tune(self) -> None:
        started = time.perf_counter()
        result = tune(self._options, log=lambda line: logger.info(line.strip()))
        _quiet(result.pipeline)
        self._result = result
        request = result.plan.request
        self.default_size = (request.width, request.height)
        self._bytes_per_pixel = self._measured_bytes_per_pixel(result)
        # Like the per-image peak, the step time is the tuning smoke test's and is kept after a
        # tier change: the smoke test of a tier that recovery moves to runs at a size the Result
        # does not record.
        self._step = (result.attempts[-1].step_seconds or 0.0, self._smoke_size(result))
        self._snapshot(result)
        logger.info(summary(json_ready(result.report()), time.perf_counter() - started))
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
        default = Generation(
            "", None, request.width, request.height, DEFAULT_STEPS, None, seed=0, n=1
        )
        refusal = self.refusal(default)
        if refusal is not None:
            logger.warning(
                "a request with the default size and steps is refused: %s", refusal.detail
            )
        if result.chosen.tier.compiled:
            self._warm_up(result)
        elif self.settings.sizes:
            logger.info("--sizes: the plan is eager, so every size is served as it comes")
        with self._cond:
            if self._state == TUNING:
                self._state = READY

    def _warm_up(self, result: Result) -> None:
        """Run a call of every image count at every served size once, so that the graphs of
        every shape a request can bring are compiled before the server says it is ready: up to
        the most images one call may hold (--max-batch, or a request's n when that is more), as
        far as the memory free now holds them at the largest size.

        Every count as it is, not padded up to a few buckets (docs/serving.md, "Compiled
        plans", has the CPU measurement): padding cost 11% (3 images run as 4) to 43% (5 as 8),
        and the static graph per bucket it would allow, 3-27% faster at 2, 4 and 8 images,
        needs a compile per bucket and size, past dynamo's recompile_limit (8 graphs a code
        object). So the batch dimension is dynamic: torch's automatic dynamic shapes make it so
        at the second count, as torch._dynamo.mark_dynamic would (a regionally compiled
        denoiser's blocks take tensors made inside the pipeline: there is no input to mark),
        and the other counts only run, or compile here rather than in a request."""
        sizes = tuple(dict.fromkeys([self.default_size, *self.settings.sizes]))
        for width, height in sizes[1:]:
            one = Generation("", None, width, height, DEFAULT_STEPS, None, seed=0, n=1)
            refusal = self.refusal(one)
            if refusal is not None and refusal.status == 413:
                raise AutoquantError(f"--sizes {width}x{height}: {refusal.detail}")
        largest = max(width * height for width, height in sizes)
        most = max(self.settings.max_batch, MAX_IMAGES)
        free = available_bytes(result.plan.device, self.settings.vram_limit_bytes)
        most_images = images_that_fit(free, self._bytes_per_pixel * largest, most)
        started, before = time.perf_counter(), compiled_graphs()
        hits, misses = compile_cache_lookups()
        for width, height in sizes:
            for images in range(1, most_images + 1):
                warm = Generation("warm-up", None, width, height, WARMUP_STEPS, None, 0, images)
                self._call([Job(warm)], on_step_end=None)
        self._graphs_seen = compiled_graphs()
        hits_after, misses_after = compile_cache_lookups()
        self.shapes = Shapes(
            most_images,
            sizes,
            self._graphs_seen - before,
            time.perf_counter() - started,
            hits_after - hits,
            misses_after - misses,
        )
        self.metrics.warmed_up(self.shapes.compiles, self.shapes.seconds)
        logger.info(
            "warmed up the compiled plan in %.1f s (%d graphs compiled; inductor's cache: %d "
            "hits, %d misses): calls of 1 to %d images at %s; no other size is served",
            self.shapes.seconds,
            self.shapes.compiles,
            self.shapes.cache_hits,
            self.shapes.cache_misses,
            most_images,
            ", ".join(self.shapes.size_names()),
        )
        if self.shapes.compiles and result.compile_cache_file is not None:
            # The tuning saved the smoke test's graphs only; without the warm-up's (the batch
            # dimension's dynamic one: an SDXL server's warm-up took 227 s on an H100,
            # docs/runs/2026-12-07-h100-serve/) a start on a fresh machine compiles them again.
            # Torch records the graphs its caches served as well as those it generated.
            try:
                save_artifacts(result.compile_cache_file)
            except OSError as err:  # a cache not written costs the next start, not this one
                logger.warning("could not save the warm-up's graphs to the compile cache: %s", err)
            else:
                logger.info("saved the warm-up's graphs to the compile cache")

    def _smoke_size(self, result: Result) -> tuple[int, int]:
        """The smoke test's size. It is not in the Result, so it is worked out from the
        options the way tune() does."""
        side = self._options.smoke_size
        return (side or result.plan.request.width, side or result.plan.request.height)

    def _snapshot(self, result: Result) -> None:
        """The report /report serves and the bounds of a request, for ``result`` as it is now
        (after a tier change too)."""
        from autoquant import models

        spec = self._options.model
        local = models.resolve(spec, self._options.config).kind == "local"
        report = json_ready(result.report())
        private = private_locations(result, spec, local_model=local)
        self.report = public_report(report, private, local_model=local)
        self.admission = Admission.for_result(result, self._step, self.settings.max_request_seconds)

    def _measured_bytes_per_pixel(self, result: Result) -> float:
        """The smoke test's peak above the weights, per image pixel."""
        attempt = result.attempts[-1]
        if attempt.peak_bytes is None or attempt.weights_bytes is None:
            return 0.0
        width, height = self._smoke_size(result)
        return max(0, attempt.peak_bytes - attempt.weights_bytes) / (width * height)

    def _images_allowed(self, generation: Generation) -> int:
        if self.settings.max_batch == 1:
            return 1
        assert self._result is not None
        free = available_bytes(self._result.plan.device, self.settings.vram_limit_bytes)
        per_image = self._bytes_per_pixel * generation.width * generation.height
        fit = images_that_fit(free, per_image, self.settings.max_batch)
        # Every request of a call waits for all of it: the call must finish in time too.
        admission = self.admission
        return admission.images_in_time(generation, fit) if admission is not None else fit

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
        """The next batch to run, or None once closed with an empty queue or aborted."""
        with self._cond:
            while not self._jobs and not self._closed and self.aborted_by is None:
                self._cond.wait()
            batch: list[Job] = []
            if self._jobs and self.aborted_by is None:
                head = self._jobs[0].generation
                limit = self.last_limit = self._images_allowed(head)
                deadline = time.monotonic() + self.settings.batch_window
                while True:
                    batch, full = self._matching(head.batch_key, limit)
                    remaining = deadline - time.monotonic()
                    if full or remaining <= 0 or self._state != READY:
                        break
                    self._cond.wait(remaining)
            if self.aborted_by is not None:
                unrun = list(self._jobs)
                self._jobs.clear()
            elif not batch:
                return None
            else:
                for job in batch:
                    self._jobs.remove(job)
                self._current = batch
                return [job for job in batch if job.future.set_running_or_notify_cancel()]
        self.aborted_requests += len(unrun)
        logger.warning("aborting the drain: %d queued request(s) answered unrun", len(unrun))
        for job in unrun:
            _settle(job, error=AbortedError())
        return None

    def _serve(self, batch: list[Job]) -> None:
        if batch:
            assert self._result is not None
            run = self._run_batch, self._run_single
            try:
                outputs = run_halving(batch, *run, self._result.plan.device, self.metrics)
            except Exception as err:  # the batch's requests get it (a 500, or 507 for OOM)
                for job in batch:
                    _settle(job, error=err)
            else:
                for job, images in zip(batch, outputs, strict=True):
                    if images:
                        _settle(job, images=images)
                    else:  # stopped before it finished: its client left, or the abort
                        _settle(job, error=AbortedError() if self.aborted_by else CallStopped())
        with self._cond:
            self._current = []

    def _stop_reason(self, jobs: list[Job]) -> str | None:
        if self.aborted_by is not None:
            return "the drain was aborted"
        if all(job.cancelled for job in jobs):
            return "every client of the call left"
        return None

    def _unless_stopped(
        self, jobs: list[Job], call: Callable[[Callable[..., Any]], list[list[Image]]]
    ) -> list[list[Image]]:
        """``call(on_step_end)``'s images per job; no images for any job when the call is not
        worth running or was stopped at a step (``on_step_end`` raises CallStopped then)."""
        if self._stop_reason(jobs) is not None:
            return [[] for _ in jobs]
        steps = jobs[0].generation.steps

        def on_step_end(_pipe: Any, step: int, _timestep: Any, _tensors: Any) -> dict[str, Any]:
            reason = self._stop_reason(jobs)
            if reason is not None:
                raise CallStopped(f"at step {step + 1}/{steps}: {reason}")
            return {}

        try:
            return call(on_step_end)
        except CallStopped as stop:
            why = str(stop)
        finally:
            self._count_recompiles(jobs)
        # Outside the except block: its traceback would keep the stopped call's tensors alive.
        assert self._result is not None
        memory.free(self._result.plan.device, keep_compiled=True)  # the tier serves on
        self.metrics.call_stopped()
        logger.info("stopped a call of %d request(s) %s", len(jobs), why)
        return [[] for _ in jobs]

    def _count_recompiles(self, jobs: list[Job]) -> None:
        """Count the graphs torch compiled during the latest call, once the warm-up has run."""
        if self.shapes is None:
            return
        graphs = compiled_graphs()
        if graphs > self._graphs_seen:
            g = jobs[0].generation
            images = sum(job.image_count for job in jobs)
            self.metrics.recompiled(graphs - self._graphs_seen)
            logger.warning(
                "%d graph(s) compiled after the warm-up, by a call of %d image(s) at %dx%d",
                graphs - self._graphs_seen,
                images,
                g.width,
                g.height,
            )
            self._graphs_seen = graphs

    def _call(self, jobs: list[Job], on_step_end: Callable[..., Any] | None) -> list[list[Image]]:
        """One pipeline call of ``jobs``; each job's images."""
        assert self._result is not None
        from autoquant.execute.build import pipeline_call_kwargs

        pipe: Any = self._result.pipeline
        arguments = call_arguments(jobs)
        if on_step_end is not None:
            arguments["callback_on_step_end"] = on_step_end
        output = pipe(**pipeline_call_kwargs(self._result.inventory, pipe, **arguments))
        return split_images(list(output.images), jobs)

    def _run_batch(self, jobs: list[Job]) -> list[list[Image]]:
        def call(on_step_end: Callable[..., Any]) -> list[list[Image]]:
            per_job = self._call(jobs, on_step_end)
            self.metrics.batch_ran(len(jobs), sum(job.image_count for job in jobs))
            return per_job

        return self._unless_stopped(jobs, call)

    def _run_single(self, job: Job) -> list[Image]:
        assert self._result is not None
        from autoquant.execute.recover import generate

        result = self._result

        def call(on_step_end: Callable[..., Any]) -> list[list[Image]]:
            changes = len(result.adjustments)
            arguments = call_arguments([job]) | {"callback_on_step_end": on_step_end}
            output = generate(result, _log_adjustment, **arguments)
            if len(result.adjustments) > changes:  # remedies or a tier change: re-snapshot
                self.metrics.oom_recovered(len(result.adjustments) - changes)
                _quiet(result.pipeline)
                self._snapshot(result)
            self.metrics.batch_ran(1, job.image_count)
            return [list(output.images)]

        return self._unless_stopped([job], call)[0]


def _settle(
    job: Job, *, images: list[Image] | None = None, error: BaseException | None = None
) -> None:
    """Answer ``job`` unless it is answered already (or was cancelled before it ran)."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(images or [])


def _quiet(pipe: Any) -> None:
    pipe.set_progress_bar_config(disable=True)  # a bar per request would flood the log


def _log_adjustment(line: str) -> None:
    logger.warning(line.strip())


def summary(report: dict[str, Any], seconds: float) -> str:
    """One line for the log: what was chosen and what it measured."""
    chosen, measured = report["chosen"], report["measured"]
    peak = measured["peak_bytes"]
    step = measured["smoke_step_seconds"]
    return (
        f"tuned {report['model']} in {seconds:.1f} s: {chosen['label']} on {measured['device']} "
        f"({chosen['description']}); peak {format_bytes(peak) if peak else 'n/a'}, "
        f"smoke test {f'{step:.3f} s/step' if step else 'n/a'}"
        + (f"; warnings: {'; '.join(report['warnings'])}" if report["warnings"] else "")
    )
