"""The HTTP API in front of the worker: `POST /generate`, `GET /health`, `/report`, `/metrics`,
the OpenAI images API (serve/openai_api.py) and the OpenAPI docs at `/docs`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Future
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from autoquant.core.errors import AutoquantError, error_line
from autoquant.planner.fidelity import fidelity_rank
from autoquant.serve import metrics as metrics_text
from autoquant.serve.metrics import Metrics
from autoquant.serve.openai_api import OPENAI_IMAGES_PATH, Failure, add_openai_routes
from autoquant.serve.report import redact_paths
from autoquant.serve.schema import (
    MAX_BODY_BYTES,
    MAX_SEED,
    GenerateRequest,
    Generation,
    SizeLimits,
    request_model,
    resolve,
)
from autoquant.serve.worker import (
    READY,
    AbortedError,
    NotAcceptingError,
    QueueFullError,
    Worker,
)

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger("autoquant.serve")

# Not an HTTP status of the standard: nginx's "client closed request", which is what /metrics
# counts for a request whose client left before its answer (nobody receives the answer).
CLIENT_CLOSED_REQUEST = 499

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_TYPE, PNG_TYPE = "application/json", "image/png"
_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "by the Accept header alone (the seed also in X-Seed): application/json "
        "(the default, and */*) → {seed, width, height, images: [base64 PNG, …]} for any n; "
        "image/png → the PNG itself, for n = 1 only",
        "content": {JSON_TYPE: {}, PNG_TYPE: {}},
    },
    406: {"description": "Accept allows neither type, or image/png with n > 1"},
    413: {"description": "the body is too large, or the request needs more memory than here"},
    422: {
        "description": "a field is invalid (`errors` names it), the request would take "
        "longer than --max-request-seconds, or a compiled server does not serve its size"
    },
    503: {
        "description": "tuning, draining, aborted, or the queue is full: retry after Retry-After s"
    },
    507: {"description": "does not fit in memory even on the last tier"},
}


def response_type(accept: str | None) -> str | None:
    """The type `POST /generate` answers in for an Accept header: the one of JSON and PNG with
    the higher quality (the most specific media range that matches sets it), JSON on a tie, so
    `*/*` and no header mean JSON; None when Accept rules both out. It depends on the header
    alone, never on the request: a client always knows what comes back."""
    if not accept or not accept.strip():
        return JSON_TYPE
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0  # a range with a malformed weight accepts nothing
        if media:
            ranges.append((media.lower(), quality))

    def quality_of(offered: str) -> float:
        kind = offered.split("/")[0]
        for candidate in (offered, f"{kind}/*", "*/*"):  # the most specific range decides
            matches = [q for media, q in ranges if media == candidate]
            if matches:
                return max(matches)
        return 0.0

    best = max((JSON_TYPE, PNG_TYPE), key=quality_of)  # max keeps the first (JSON) on a tie
    return best if quality_of(best) > 0 else None


def _png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _field(error: dict[str, Any]) -> str:
    """("body", "width") → "width"; a body that is not JSON (its loc is a character offset) or
    not an object → "body"."""
    if error.get("type") == "json_invalid":
        return "body"
    parts = [str(part) for part in error.get("loc", ()) if part != "body"]
    return ".".join(parts) or "body"


def _unavailable(reason: str, retry_after: int) -> JSONResponse:
    return JSONResponse(
        {"detail": reason}, status_code=503, headers={"Retry-After": str(retry_after)}
    )


class GenerateGate:
    """ASGI middleware in front of `POST /generate` and the OpenAI images endpoint: a body over
    ``max_body`` bytes is refused with 413 before anything reads it whole or parses it, and
    every answer is counted by the status it really had (one the app never sent, because it
    raised, counts as 500)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/generate", OPENAI_IMAGES_PATH):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body = await self._body(scope, receive)
            if body is None:
                await _too_large(self.max_body, counted)
                return
            await self.app(scope, _replay(body, receive), counted)
        finally:
            self.metrics.request_finished(status, time.perf_counter() - started)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the limit (by its Content-Length, or
        counted as it arrives when it is chunked)."""
        for name, value in scope["headers"]:
            if name == b"content-length" and int(value) > self.max_body:
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body read already handed out first, then the client's own
    messages (so the app still hears when the client disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _too_large(limit: int, send: Send) -> None:
    payload = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            # The rest of the body is never read: the connection cannot carry another request.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (uvicorn answers http.disconnect once it has)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer_or_gone(
    future: Future[list[Image]], receive: Receive
) -> asyncio.Future[list[Image]] | None:
    """``future`` as an asyncio future once it is done, or None if the client left first."""
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _pending = await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer in done:
        return answer
    answer.cancel()  # cancels the request's future too while it is still queued
    return None


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT stops accepting connections, waits for the
    open requests (the queued ones among them) and then runs the lifespan shutdown. The worker
    is told first, so a request that arrives before the socket closes gets a 503.

    A second signal aborts the drain: the worker answers what is queued with 503 and stops
    the running call at its next step; uvicorn then finishes as after a drain (its own answer
    to a second Ctrl-C, a forced exit, would leave the worker thread running torch code while
    the interpreter shuts down, and every queued request unanswered)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self._worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self._worker.abort(sig)
            return
        self._worker.stop_accepting()
        super().handle_exit(sig, frame)


def fidelity_refusal(asked: str | None, report: dict[str, Any] | None) -> str | None:
    """Why a request asking for fidelity class ``asked`` (or better) cannot run on the plan of
    ``report``, or None when it can."""
    served = (report or {}).get("chosen", {}).get("fidelity")
    if asked is None or not served or fidelity_rank(served) <= fidelity_rank(asked):
        return None
    label = report["chosen"]["label"] if report else ""
    return f"fidelity {asked} asked for: this server runs {label}, of the {served} class"


def create_app(
    worker: Worker, limits: SizeLimits | None = None, replica: str | None = None
) -> FastAPI:
    """The app for ``worker``; its lifespan starts the worker and, on shutdown, lets it finish
    the queue before returning. ``replica`` names this server among others behind one endpoint
    (serve/ray_deploy.py): /report and /metrics then say which replica answered."""
    metrics = worker.metrics
    body_model = request_model(limits or SizeLimits())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(
        title="autoquant",
        summary="A diffusers pipeline, tuned for this machine, behind a queue with batching.",
        lifespan=lifespan,
    )

    def retry_after() -> int:
        median = metrics.median_latency()
        return 1 if math.isnan(median) else max(1, math.ceil(median))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field(error), "message": error.get("msg", "")} for error in exc.errors()
        ]
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": text, "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        logger.error("internal error %s", error_id, exc_info=exc)
        return JSONResponse({"detail": "internal error", "error_id": error_id}, status_code=500)

    app.add_middleware(GenerateGate, metrics=metrics)

    async def run(generation: Generation, request: Request) -> list[Image] | Failure:
        """Queue one generation and wait for its images, or say why there are none."""
        if worker.state != READY:
            return Failure(503, f"not ready: {worker.state}")
        unfaithful = fidelity_refusal(generation.fidelity, worker.report)
        if unfaithful is not None:
            return Failure(409, unfaithful, field="fidelity")
        refusal = worker.refusal(generation)
        if refusal is not None:
            return Failure(refusal.status, refusal.detail, field="body")
        try:
            future = worker.submit(generation)
        except QueueFullError:
            return Failure(503, "queue full")
        except NotAcceptingError as err:
            return Failure(503, f"not ready: {err.state}")
        answer = await _answer_or_gone(future, request.receive)
        if answer is None:
            worker.cancel(future)
            return Failure(CLIENT_CLOSED_REQUEST, "the client left")
        try:
            return answer.result()
        except AbortedError:
            return Failure(503, "aborted: the server is shutting down")
        except NotAcceptingError as err:  # the worker stopped before it ran this request
            return Failure(503, f"not ready: {err.state}")
        except AutoquantError as err:  # out of memory on the last tier: the request is too big
            return Failure(507, redact_paths(str(err)))

    async def generate(body: GenerateRequest, request: Request) -> Response:
        width, height = worker.default_size
        generation = resolve(body, width, height, seed=secrets.randbelow(MAX_SEED + 1))
        answer_type = response_type(request.headers.get("accept"))
        # Refused before it queues: nothing runs for an answer the client would not take.
        if answer_type is None:
            return JSONResponse(
                {"detail": f"Accept allows neither {JSON_TYPE} nor {PNG_TYPE}"}, status_code=406
            )
        if answer_type == PNG_TYPE and generation.n > 1:
            return JSONResponse(
                {
                    "detail": f"Accept: {PNG_TYPE} carries one image and n is {generation.n}: "
                    f"ask for {JSON_TYPE} (base64 PNGs) or n = 1"
                },
                status_code=406,
            )
        outcome = await run(generation, request)
        if isinstance(outcome, Failure):
            if outcome.status == CLIENT_CLOSED_REQUEST:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            if outcome.status == 503:
                return _unavailable(outcome.detail, retry_after())
            body_: dict[str, Any] = {"detail": outcome.detail}
            if outcome.field:
                body_["errors"] = [{"field": outcome.field, "message": outcome.detail}]
            return JSONResponse(body_, status_code=outcome.status)
        images = outcome
        headers = {"X-Seed": str(generation.seed), "Vary": "Accept"}
        if answer_type == PNG_TYPE:
            png = await asyncio.to_thread(_png, images[0])
            return Response(png, media_type=PNG_TYPE, headers=headers)
        pngs = await asyncio.to_thread(lambda: [_png(image) for image in images])
        return JSONResponse(
            {
                "seed": generation.seed,
                "width": generation.width,
                "height": generation.height,
                "images": [base64.b64encode(png).decode("ascii") for png in pngs],
            },
            headers=headers,
        )

    # The body's type carries this server's size bounds (validation and OpenAPI schema alike);
    # it is built at run time, so it is set on the endpoint rather than written in its signature.
    generate.__annotations__["body"] = body_model
    app.add_api_route(
        "/generate",
        generate,
        methods=["POST"],
        response_class=Response,
        responses=_GENERATE_RESPONSES,
        summary="Generate images for a prompt",
    )

    add_openai_routes(
        app,
        run=run,
        worker=worker,
        limits=limits or SizeLimits(),
        png=_png,
        retry_after=retry_after,
    )

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = worker.state == READY
        body: dict[str, Any] = {"status": worker.state}
        if worker.error is not None:
            body["error"] = redact_paths(error_line(worker.error))
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/report")
    async def report() -> JSONResponse:
        if worker.report is None:
            return _unavailable(f"not ready: {worker.state}", retry_after())
        # Its paths are replaced already (serve/report.py).
        shapes = worker.shapes_report()
        extra = ({"replica": replica} if replica else {}) | ({"shapes": shapes} if shapes else {})
        return JSONResponse(worker.report | extra)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> PlainTextResponse:
        state = worker.state
        gauges: dict[str, tuple[str, float]] = {
            "autoquant_ready": ("1 when tuned and accepting requests", int(state == READY)),
            "autoquant_queue_depth": ("requests waiting to run", worker.queue_depth()),
            "autoquant_running_requests": ("requests in the running batch", worker.running()),
            "autoquant_max_batch": ("--max-batch (1: batching off)", worker.settings.max_batch),
            "autoquant_batch_limit_images": (
                "images per call that free memory allowed for the latest batch",
                worker.last_limit,
            ),
        }
        text = metrics.render(gauges)
        chosen = (worker.report or {}).get("chosen", {})
        if replica is not None:
            text += metrics_text.info(
                "autoquant_replica_info",
                "the replica that answered and the plan it runs",
                replica=replica,
                plan=chosen.get("label", ""),
                fidelity=chosen.get("fidelity", ""),
            )
        return PlainTextResponse(text, media_type=metrics_text.CONTENT_TYPE)

    return app
