"""`autoquant serve --ray`: the same FastAPI app (serve/app.py) as the replicas of a Ray Serve
deployment, each tuned to the device it was given.

Each replica builds its own Worker: it probes its own device (Ray gives a GPU replica one card,
through CUDA_VISIBLE_DEVICES), plans and tunes, then serves the native and the OpenAI APIs
unchanged. Ray Serve supplies what a fleet needs and one process does not: the proxy that
spreads requests by load, replacement of a replica that died or failed its health check, and
autoscaling on ongoing requests.

Batching stays the Worker's. Ray's `@serve.batch` gathers calls by count and wait time; the
Worker batches by what one pipeline call can serve (the batch key: size, steps, guidance,
negative prompt) and by the images that fit in the memory free right now (images_that_fit), and
halves a batch that runs out of memory. The Worker's queue bounds each replica, so Ray's
max_ongoing_requests is set to let the whole queue and a running batch in.

Tuning once per kind of machine: the tuning store's key names the card (execute/tuning_entry.py)
and the store is one JSON file replaced atomically under a file lock (store/tuning_store.py), so
two replicas that tune at once would both tune in full and both write a valid entry. Replicas on
one node (one cache folder) therefore tune in turn, under a lock of their own: the first tunes
and saves its decision, the next finds it in the store and only loads that tier and runs a
one-step smoke test. Nodes tune on their own unless AUTOQUANT_CACHE_DIR is a shared folder.

Fidelity: Ray Serve routes by load, never by a request's body. A request that asks for a
fidelity class better than its replica's plan is answered 409 (serve/app.py) rather than routed;
a fleet with several classes is run as one application per class, each on its own port.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import IO, Any

import ray
from fastapi import FastAPI
from ray import serve

from autoquant.core.errors import AutoquantError, error_line
from autoquant.execute.tuning import TuneOptions
from autoquant.serve.app import Message, Receive, Scope, Send, create_app
from autoquant.serve.metrics import Metrics
from autoquant.serve.schema import SizeLimits
from autoquant.serve.worker import FAILED, READY, TUNING, Worker, WorkerSettings
from autoquant.store.tuning_store import store_path

logger = logging.getLogger("autoquant.serve")

APP_NAME = "autoquant"
REPLICA_HEADER = "X-Autoquant-Replica"
TUNED_POLL_SECONDS = 0.1
# A replica that keeps failing to start (tuning fails the same way each time) is not retried
# for long: the deployment is reported failed instead.
CONSTRUCTOR_RETRIES = 3
HEALTH_CHECK_SECONDS = 2.0


def _tuning_lock_path() -> Path:
    return store_path().with_name("serve-tuning.lock")


def _take_lock(path: Path) -> IO[str]:
    """``path`` opened and locked exclusively (closing it releases the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115  (held open until tuned)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


async def _until_tuned(worker: Worker) -> None:
    while worker.state == TUNING:
        await asyncio.sleep(TUNED_POLL_SECONDS)
    if worker.state != READY:
        raise worker.error or RuntimeError(f"the worker is {worker.state}")


class ReplicaHeader:
    """ASGI middleware: every answer names the replica that sent it."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named)


class AutoquantReplica:
    """One replica: a Worker for this replica's device and the app in front of it. Ray calls
    ``__serve_build_asgi_app__`` for the app, then runs its lifespan, which here returns only
    once the worker has tuned: Ray sends a replica requests only after that."""

    def __init__(self, options: TuneOptions, settings: WorkerSettings, limits: SizeLimits) -> None:
        logging.getLogger("autoquant").setLevel(logging.INFO)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.worker = Worker(options, settings, Metrics())
        # Not `app`: Ray's wrapper class owns that name.
        self.fastapi_app = create_app(self.worker, limits, replica=self.replica_id)
        self.fastapi_app.add_middleware(ReplicaHeader, replica=self.replica_id)
        router = self.fastapi_app.router
        router.lifespan_context = _tuned_first(router.lifespan_context, self.worker)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.fastapi_app

    def check_health(self) -> None:
        """Raises once the worker thread has died: Ray then replaces this replica."""
        if self.worker.state == FAILED:
            error = self.worker.error
            raise RuntimeError(f"the worker died: {error_line(error) if error else 'unknown'}")


def _tuned_first(inner: Any, worker: Worker) -> Any:
    """The app's lifespan (it starts the worker, and drains it on shutdown), entered under the
    node's tuning lock and left only once the worker has tuned; a tuning failure fails it, and
    so the replica's start."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            lock = await asyncio.to_thread(_take_lock, _tuning_lock_path())
            try:
                await stack.enter_async_context(inner(app))
                await _until_tuned(worker)
            finally:
                lock.close()
            yield

    return lifespan


def deployment_options(
    settings: WorkerSettings, replicas: int | None, gpus: float
) -> dict[str, Any]:
    """serve.deployment's options: ``replicas`` of them, or Ray Serve's autoscaling (None); one
    GPU a replica where the cluster has GPUs, else one CPU (PyTorch's threads are no Ray
    resource: the CPU only spreads the replicas over the nodes' cores)."""
    options: dict[str, Any] = {
        "name": "autoquant",
        "ray_actor_options": {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1},
        # The Worker's queue refuses (503) past queue_size; Ray's own limit lets it fill.
        "max_ongoing_requests": settings.queue_size + settings.max_batch,
        "health_check_period_s": HEALTH_CHECK_SECONDS,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        # A replica taken down drains its queue first (the lifespan's shutdown), as
        # `autoquant serve` does on SIGTERM; requests are bounded by --max-request-seconds.
        "graceful_shutdown_timeout_s": settings.max_request_seconds + 10,
    }
    if replicas is None:
        # A replica with a full batch queued is as busy as it should be: one more request
        # waits a whole call, so Ray Serve adds a replica past that.
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {"target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = replicas
    return options


def application(
    options: TuneOptions, settings: WorkerSettings, limits: SizeLimits, replicas: int | None
) -> Any:
    """The bound Ray Serve application (for serve.run), for the cluster ray.init() joined."""
    gpus = ray.cluster_resources().get("GPU", 0)
    deploy = serve.deployment(**deployment_options(settings, replicas, gpus))
    return deploy(serve.ingress()(AutoquantReplica)).bind(options, settings, limits)


def run(
    options: TuneOptions,
    settings: WorkerSettings,
    limits: SizeLimits,
    replicas: int | None,
    *,
    host: str,
    port: int,
    address: str | None,
) -> int:
    """Join the cluster at ``address`` (None: start one on this machine), deploy, and serve
    until SIGTERM/SIGINT; then take the application down, its replicas draining their queues.
    A deployment whose replicas cannot start (tuning fails) raises AutoquantError."""
    ray.init(address=address, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(
                application(options, settings, limits, replicas), name=APP_NAME, route_prefix="/"
            )
        except RuntimeError as err:  # Ray's deployment failure, with the replicas' errors
            raise AutoquantError(f"the Ray Serve deployment failed: {error_line(err)}") from None
        logger.info("serving on http://%s:%d through Ray Serve", host, port)
        stop = threading.Event()
        previous = {
            sig: signal.signal(sig, lambda _sig, _frame: stop.set())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            while not stop.wait(1.0):  # a timeout, so that signals are handled meanwhile
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        logger.info("stopping: the replicas drain their queues")
        serve.delete(APP_NAME)
        return 0
    finally:
        if address is None:  # the cluster is this process's own
            serve.shutdown()
        ray.shutdown()
