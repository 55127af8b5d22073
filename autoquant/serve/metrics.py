"""Counters the server keeps, rendered in the Prometheus text format (no client library: a
handful of counters does not need one)."""

from __future__ import annotations

import math
import threading
from collections import Counter, deque

# Latency percentiles cover the most recent requests only, so they follow the current load.
LATENCY_WINDOW = 1000
QUANTILES = (0.5, 0.95, 0.99)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class Metrics:
    """Thread-safe: the worker thread and the event loop both record into it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[int] = Counter()  # by HTTP status
        self._batch_sizes: Counter[int] = Counter()  # requests per pipeline call
        self._images = 0
        self._recompiles = 0  # graphs torch compiled after a compiled plan's warm-up
        self._warmup: tuple[int, float] = (0, 0.0)  # its graphs compiled and seconds
        self._ooms_recovered = 0
        self._batch_splits = 0
        self._cancelled: Counter[str] = Counter()  # by where the request was: queued, running
        self._stopped_calls = 0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._latency_sum = 0.0
        self._latency_count = 0

    def request_finished(self, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[status] += 1
            if status == 200:
                self._latencies.append(seconds)
                self._latency_sum += seconds
                self._latency_count += 1

    def batch_ran(self, requests: int, images: int) -> None:
        with self._lock:
            self._batch_sizes[requests] += 1
            self._images += images

    def warmed_up(self, compiles: int, seconds: float) -> None:
        with self._lock:
            self._warmup = (compiles, seconds)

    def recompiled(self, graphs: int) -> None:
        with self._lock:
            self._recompiles += graphs

    def recompiles(self) -> int:
        with self._lock:
            return self._recompiles

    def oom_recovered(self, count: int = 1) -> None:
        with self._lock:
            self._ooms_recovered += count

    def batch_split(self) -> None:
        with self._lock:
            self._batch_splits += 1

    def cancelled(self, stage: str) -> None:
        with self._lock:
            self._cancelled[stage] += 1

    def call_stopped(self) -> None:
        with self._lock:
            self._stopped_calls += 1

    def median_latency(self) -> float:
        with self._lock:
            return percentile(list(self._latencies), 0.5)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges`` maps a metric name to (help, value) for the
        point-in-time figures the caller owns (queue depth, readiness, …)."""
        with self._lock:
            lines: list[str] = []
            add = _Writer(lines)
            add.header(
                "autoquant_requests_total",
                "counter",
                "POST /generate answers by status (499: the client left before the answer)",
            )
            for status in sorted(self._requests):
                add.sample("autoquant_requests_total", self._requests[status], status=str(status))
            batches = sum(self._batch_sizes.values())
            add.header("autoquant_batches_total", "counter", "pipeline calls")
            add.sample("autoquant_batches_total", batches)
            add.header(
                "autoquant_batch_size_total", "counter", "pipeline calls by requests per call"
            )
            for size in sorted(self._batch_sizes):
                add.sample("autoquant_batch_size_total", self._batch_sizes[size], size=str(size))
            add.header("autoquant_images_total", "counter", "images generated")
            add.sample("autoquant_images_total", self._images)
            add.header(
                "autoquant_recompiles_total",
                "counter",
                "graphs torch.compile compiled after the warm-up (a shape it did not run, or a "
                "recovery that rebuilt or reset the compiled tier); 0 for an eager plan",
            )
            add.sample("autoquant_recompiles_total", self._recompiles)
            compiles, seconds = self._warmup
            add.header(
                "autoquant_warmup_compiles",
                "gauge",
                "graphs torch.compile compiled by the warm-up at start (0: an eager plan)",
            )
            add.sample("autoquant_warmup_compiles", compiles)
            add.header(
                "autoquant_warmup_seconds",
                "gauge",
                "seconds the warm-up took: a call per image count and size, compiles included",
            )
            add.sample("autoquant_warmup_seconds", seconds)
            add.header(
                "autoquant_ooms_recovered_total",
                "counter",
                "out-of-memory errors recovered from (batch split or memory remedy)",
            )
            add.sample("autoquant_ooms_recovered_total", self._ooms_recovered)
            add.header(
                "autoquant_batch_splits_total", "counter", "batches halved after out of memory"
            )
            add.sample("autoquant_batch_splits_total", self._batch_splits)
            add.header(
                "autoquant_cancelled_total",
                "counter",
                "requests whose client left, by where they were (queued: dropped unrun)",
            )
            for stage in sorted(self._cancelled):
                add.sample("autoquant_cancelled_total", self._cancelled[stage], stage=stage)
            add.header(
                "autoquant_stopped_calls_total",
                "counter",
                "pipeline calls stopped at a step: every client left, or the drain was aborted",
            )
            add.sample("autoquant_stopped_calls_total", self._stopped_calls)
            add.header(
                "autoquant_request_latency_seconds",
                "summary",
                f"POST /generate latency of 200 answers (quantiles over the last {LATENCY_WINDOW})",
            )
            recent = list(self._latencies)
            for q in QUANTILES:
                add.sample("autoquant_request_latency_seconds", percentile(recent, q), quantile=q)
            add.sample("autoquant_request_latency_seconds_sum", self._latency_sum)
            add.sample("autoquant_request_latency_seconds_count", self._latency_count)
        for name, (help_text, value) in gauges.items():
            add.header(name, "gauge", help_text)
            add.sample(name, value)
        return "\n".join(lines) + "\n"


def info(name: str, help_text: str, **labels: object) -> str:
    """A gauge of 1 whose labels carry facts (Prometheus' info idiom), in exposition text."""
    lines: list[str] = []
    add = _Writer(lines)
    add.header(name, "gauge", help_text)
    add.sample(name, 1, **labels)
    return "\n".join(lines) + "\n"


class _Writer:
    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    def header(self, name: str, kind: str, help_text: str) -> None:
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: object) -> None:
        text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        series = f"{name}{{{text}}}" if text else name
        self._lines.append(f"{series} {_number(value)}")


def _label_value(value: object) -> str:
    """``value`` escaped as the exposition format's label values are (a plan's label may hold
    any character)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)  # counts stay exact (no 1.2e+06)
    return "NaN" if math.isnan(value) else repr(float(value))
