"""The OpenAI images API on the tuned pipeline: `POST /v1/images/generations` and
`GET /v1/models`, so that clients written for OpenAI (the official `openai` package:
`OpenAI(base_url=".../v1").images.generate(...)`) run unchanged. Images come back as base64 PNGs
(`response_format="b64_json"`); this server keeps no files to link to, so `url` is refused.
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoquant.serve.schema import MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, Generation, SizeLimits

if TYPE_CHECKING:
    from PIL.Image import Image

    from autoquant.serve.worker import Worker

OPENAI_IMAGES_PATH = "/v1/images/generations"
# OpenAI's default for a request that names no step count has no meaning here: the server's own.
_STEPS = 20


@dataclass(frozen=True)
class Failure:
    """Why a generation produced no images: the HTTP status and a sentence for the client
    (``field``: the request field it is about)."""

    status: int
    detail: str
    field: str | None = None


class ImagesRequest(BaseModel):
    """OpenAI's image generation request. `quality`, `style` and `user` are accepted and have no
    effect (one pipeline, tuned once); any other unknown field is refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _size(text: str | None, default: tuple[int, int], limits: SizeLimits) -> tuple[int, int]:
    """``"1024x1024"`` → (1024, 1024) within this server's bounds; None or "auto": the tuned
    size. A bad size raises ValueError with the sentence to return."""
    if text is None or text == "auto":
        return default
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 1024x1024, or auto")
    sides = int(width), int(height)
    if any(side % 8 or not limits.min_side <= side <= limits.max_side for side in sides):
        raise ValueError(
            f"size {text!r}: each side must be a multiple of 8 from {limits.min_side} to "
            f"{limits.max_side}"
        )
    return sides


def add_openai_routes(
    app: FastAPI,
    *,
    run: Callable[[Generation, Request], Awaitable[list[Image] | Failure]],
    worker: Worker,
    limits: SizeLimits,
    png: Callable[[Image], bytes],
    retry_after: Callable[[], int],
) -> None:
    """Add the OpenAI routes to ``app``; ``run`` queues a generation as `POST /generate` does."""

    def model_id() -> str | None:
        return worker.report["model"] if worker.report else None

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        served = model_id()
        data = [{"id": served, "object": "model", "created": 0, "owned_by": "autoquant"}]
        return JSONResponse({"object": "list", "data": data if served else []})

    @app.post(OPENAI_IMAGES_PATH, summary="Generate images (the OpenAI images API)")
    async def generations(request: Request) -> JSONResponse:
        try:
            body = ImagesRequest.model_validate_json(await request.body())
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(part) for part in first.get("loc", ())) or None
            return openai_error(400, f"{param}: {first.get('msg', 'invalid')}", param=param)
        if body.response_format == "url":
            message = (
                "response_format url is not supported (this server keeps no files): use b64_json"
            )
            return openai_error(400, message, param="response_format")
        served = model_id()
        if body.model is not None and served is not None and body.model != served:
            message = f"this server serves {served!r}, not {body.model!r} (GET /v1/models)"
            return openai_error(404, message, param="model", code="model_not_found")
        try:
            width, height = _size(body.size, worker.default_size, limits)
        except ValueError as err:
            return openai_error(400, str(err), param="size")
        generation = Generation(
            prompt=body.prompt,
            negative_prompt=None,
            width=width,
            height=height,
            steps=_STEPS,
            guidance_scale=None,
            seed=secrets.randbelow(MAX_SEED + 1),
            n=body.n,
        )
        outcome = await run(generation, request)
        if isinstance(outcome, Failure):
            headers = {"Retry-After": str(retry_after())} if outcome.status == 503 else None
            return openai_error(
                outcome.status, outcome.detail, param=outcome.field, headers=headers
            )
        pngs = await asyncio.to_thread(lambda: [png(image) for image in outcome])
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(data).decode("ascii")} for data in pngs],
                "seed": generation.seed,
            },
            headers={"X-Seed": str(generation.seed)},
        )
