"""`autoquant serve --ray`: the same FastAPI app (serve/app.py) as the replicas of a Ray Serve
deployment, each tuned to the device it was given.

Each replica builds its own Worker: it probes its own device (Ray gives a GPU replica one card,
through CUDA_VISIBLE_DEVICES), plans and tunes, then serves the native and the OpenAI APIs
unchanged. Ray Serve supplies what a fleet needs and one process does not: the proxy that
spreads requests by load, replacement of a replica that died or failed its health check, and
autoscaling on ongoing requests.

Two deployments make the application. The replicas ("autoquant") hold the workers; in front of
them a light ingress ("autoquant-ingress", no CPU of its own) takes Ray Serve's HTTP requests
and hands each to a replica through a DeploymentHandle. A replica whose process dies takes its
running and queued requests with it: Ray's proxy answers those 500 when it calls the replica
itself, and retries only a request not yet sent to one. Through the handle the ingress sees the
death as Ray's RayActorError instead and answers 503 with Retry-After, as the worker answers
when it cannot take a request; Ray's router has by then dropped the dead replica, so a retry
goes to another.

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
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from autoquant.core.errors import AutoquantError, error_line
from autoquant.execute.tuning import TuneOptions
from autoquant.serve.app import Message, Receive, Scope, Send, create_app
from autoquant.serve.metrics import Metrics
from autoquant.serve.schema import MAX_BODY_BYTES, SizeLimits
from autoquant.serve.worker import FAILED, READY, TUNING, Worker, WorkerSettings
from autoquant.store.tuning_store import store_path

logger = logging.getLogger("autoquant.serve")

APP_NAME = "autoquant"
REPLICAS_DEPLOYMENT = "autoquant"
INGRESS_DEPLOYMENT = "autoquant-ingress"
REPLICA_HEADER = "X-Autoquant-Replica"
TUNED_POLL_SECONDS = 0.1
# A replica that keeps failing to start (tuning fails the same way each time) is not retried
# for long: the deployment is reported failed instead.
CONSTRUCTOR_RETRIES = 3
HEALTH_CHECK_SECONDS = 2.0
# Retry-After of a request whose replica died under it. Ray's router drops a replica on the
# RayActorError of a call to it, so a retry at once finds the others.
REPLICA_LOST_RETRY_AFTER = 1
# The ASGI scope's fields a replica's app reads, all plain values that pickle; the rest of the
# ingress's scope (its app, router, Ray's own keys) is this process's.
FORWARDED_SCOPE = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "root_path",
    "headers",
    "client",
    "server",
)


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


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress hands it to a replica: its scope's plain fields and its
    body, read whole (the app refuses a body over MAX_BODY_BYTES, so no more is read)."""

    scope: dict[str, Any]
    body: bytes


@dataclass(frozen=True)
class ForwardedAnswer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


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

    async def forward(self, request: ForwardedRequest) -> ForwardedAnswer:
        """The app's answer to a request the ingress forwarded. A client that leaves cancels
        this call (Ray Serve cancels a handle call when the request that made it is cancelled);
        the app then hears http.disconnect, as from uvicorn, and drops the request's work."""
        gone = asyncio.Event()
        pending = [{"type": "http.request", "body": request.body, "more_body": False}]
        start: Message = {"status": 500, "headers": []}
        chunks: list[bytes] = []

        async def receive() -> Message:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        call = asyncio.ensure_future(self.fastapi_app(dict(request.scope), receive, send))
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            gone.set()
            await call  # the app cancels the request's queued or running work, then returns
            raise
        return ForwardedAnswer(start["status"], list(start["headers"]), b"".join(chunks))


class Ingress:
    """Ray Serve's HTTP entry: every request goes to a replica through a DeploymentHandle, so
    a replica that dies under a request is Ray's RayActorError here, answered 503."""

    def __init__(self, replicas: DeploymentHandle) -> None:
        self.replicas = replicas.options(method_name="forward")

    async def __call__(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:  # the replica's GenerateGate answers 413 for it
                break
        scope = {key: request.scope[key] for key in FORWARDED_SCOPE if key in request.scope}
        try:
            answer: ForwardedAnswer = await self.replicas.remote(ForwardedRequest(scope, body))
        except (RayActorError, DeploymentUnavailableError) as err:
            logger.warning("a replica was lost under a request: %s", error_line(err))
            return JSONResponse(
                {"detail": "the replica serving this request was lost: retry"},
                status_code=503,
                headers={"Retry-After": str(REPLICA_LOST_RETRY_AFTER)},
            )
        response = Response(answer.body, status_code=answer.status)
        response.raw_headers = answer.headers  # the app's own, content-length among them
        return response


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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """serve.deployment's options for the replicas and for the ingress: ``replicas`` of each,
    or Ray Serve's autoscaling (None). One GPU a replica where the cluster has GPUs, else one
    CPU (PyTorch's threads are no Ray resource: the CPU only spreads the replicas over the
    nodes' cores); the ingress only passes requests on and asks for no CPU."""
    common: dict[str, Any] = {
        # The Worker's queue refuses (503) past queue_size; Ray's own limit lets it fill.
        "max_ongoing_requests": settings.queue_size + settings.max_batch,
        # A replica taken down drains its queue first (the lifespan's shutdown), as
        # `autoquant serve` does on SIGTERM; requests are bounded by --max-request-seconds.
        # The ingress waits as long, for the answers it still forwards.
        "graceful_shutdown_timeout_s": settings.max_request_seconds + 10,
    }
    if replicas is None:
        # A replica with a full batch queued is as busy as it should be: one more request
        # waits a whole call, so Ray Serve adds a replica past that.
        common["num_replicas"] = "auto"
        common["autoscaling_config"] = {"target_ongoing_requests": settings.max_batch}
    else:
        common["num_replicas"] = replicas
    model = common | {
        "name": REPLICAS_DEPLOYMENT,
        "ray_actor_options": {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1},
        "health_check_period_s": HEALTH_CHECK_SECONDS,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    ingress = common | {"name": INGRESS_DEPLOYMENT, "ray_actor_options": {"num_cpus": 0}}
    return model, ingress


def application(
    options: TuneOptions,
    settings: WorkerSettings,
    limits: SizeLimits,
    replicas: int | None,
    replica_class: type[AutoquantReplica] = AutoquantReplica,
) -> Any:
    """The bound Ray Serve application (for serve.run), for the cluster ray.init() joined.
    ``replica_class``: AutoquantReplica, or a subclass of it (tests/test_ray.py's replica whose
    worker can be made to die)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    model_options, ingress_options = deployment_options(settings, replicas, gpus)
    replica = serve.deployment(**model_options)(serve.ingress()(replica_class))
    return serve.deployment(**ingress_options)(Ingress).bind(
        replica.bind(options, settings, limits)
    )


class _Stop(Exception):
    """SIGTERM or SIGINT arrived: stop serving."""


def _raise_stop(sig: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(sig).name)


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
    A deployment whose replicas cannot start (tuning fails) raises AutoquantError.

    The handlers go in as soon as ray.init() returns: it installs abseil's failure signal
    handler for SIGTERM, which prints a stack, arms a 3 s SIGALRM that aborts the process
    (exit 134), then chains to Ray's own Python handler (sys.exit). A SIGTERM while the
    replicas tuned therefore ended in an abort once the teardown it started ran past 3 s
    (ray-project/ray#64830). Python's handler replaces abseil's; it raises, so that a signal
    during the deployment (serve.run waits for the replicas to tune) stops it too."""
    ray.init(address=address, logging_level=logging.WARNING)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    deployed = False
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(
                application(options, settings, limits, replicas), name=APP_NAME, route_prefix="/"
            )
        except RuntimeError as err:  # Ray's deployment failure, with the replicas' errors
            raise AutoquantError(f"the Ray Serve deployment failed: {error_line(err)}") from None
        deployed = True
        logger.info("serving on http://%s:%d through Ray Serve", host, port)
        while True:
            signal.pause()
    except _Stop as stop:
        logger.info("%s: stopping; the replicas drain their queues", stop)
        return 0
    finally:
        # A second signal during the drain gets Ray's handlers back: SIGTERM exits at once
        # (sys.exit), SIGINT raises KeyboardInterrupt; the cluster is stopped either way.
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if deployed or address is not None:
                serve.delete(APP_NAME)
        finally:
            if address is None:  # the cluster is this process's own
                serve.shutdown()
            ray.shutdown()
