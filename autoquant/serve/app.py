"""The HTTP API in front of the worker: `POST /generate`, `GET /health`, `/report`, `/metrics`
and the OpenAPI docs at `/docs`."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from autoquant.core.errors import AutoquantError, error_line
from autoquant.serve import metrics as metrics_text
from autoquant.serve.schema import MAX_SEED, GenerateRequest, SizeLimits, request_model, resolve
from autoquant.serve.worker import (
    READY,
    NotAcceptingError,
    QueueFullError,
    Worker,
)

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger("autoquant.serve")

# An absolute filesystem path inside a string (not the tail of a URL or of "fp16/bf16").
_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.@+-]+/)*[\w.@+-]+")

_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "n = 1: the PNG (seed in the X-Seed header); n > 1: JSON with base64 PNGs",
        "content": {"image/png": {}, "application/json": {}},
    },
    422: {"description": "a field is invalid; `errors` names it"},
    503: {"description": "tuning, draining or the queue is full: retry after Retry-After s"},
    507: {"description": "does not fit in memory even on the last tier"},
}


def redact_paths(value: Any) -> Any:
    """``value`` with absolute filesystem paths in its strings replaced: responses never show
    where the server keeps its files."""
    if isinstance(value, str):
        return _PATH.sub("<path>", value)
    if isinstance(value, dict):
        return {key: redact_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_paths(item) for item in value]
    return value


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


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT stops accepting connections, waits for the
    open requests (the queued ones among them) and then runs the lifespan shutdown. The worker
    is told first, so a request that arrives before the socket closes gets a 503."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self._worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._worker.stop_accepting()
        super().handle_exit(sig, frame)


def create_app(worker: Worker, limits: SizeLimits | None = None) -> FastAPI:
    """The app for ``worker``; its lifespan starts the worker and, on shutdown, lets it finish
    the queue before returning."""
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

    @app.middleware("http")
    async def count_generate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path != "/generate":
            return await call_next(request)
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.request_finished(status, time.perf_counter() - started)

    async def generate(body: GenerateRequest) -> Response:
        if worker.state != READY:
            return _unavailable(f"not ready: {worker.state}", retry_after())
        width, height = worker.default_size
        generation = resolve(body, width, height, seed=secrets.randbelow(MAX_SEED + 1))
        try:
            future = worker.submit(generation)
        except QueueFullError:
            return _unavailable("queue full", retry_after())
        except NotAcceptingError as err:
            return _unavailable(f"not ready: {err.state}", retry_after())
        try:
            images = await asyncio.wrap_future(future)
        except AutoquantError as err:  # out of memory on the last tier: the request is too big
            return JSONResponse({"detail": redact_paths(str(err))}, status_code=507)
        headers = {"X-Seed": str(generation.seed)}
        if generation.n == 1:
            png = await asyncio.to_thread(_png, images[0])
            return Response(png, media_type="image/png", headers=headers)
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
        return JSONResponse(redact_paths(worker.report))

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
        return PlainTextResponse(metrics.render(gauges), media_type=metrics_text.CONTENT_TYPE)

    return app
