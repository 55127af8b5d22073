"""What a client may send to `POST /generate`, validated before it reaches the queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from autoquant.planner.fidelity import FIDELITY_CLASSES
from autoquant.planner.rules import GUIDANCE_SCALE

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_SEED = 2**63 - 1
DEFAULT_STEPS = 20
# Room for both prompts at their limit written with up to 6 bytes a character (any character in
# UTF-8, or a \uXXXX escape as json.dumps writes non-ASCII by default), plus the other fields.
# A longer body is refused before it is parsed.
MAX_BODY_BYTES = 2 * MAX_PROMPT_CHARS * 6 + 1024


@dataclass(frozen=True)
class SizeLimits:
    """Bounds on width and height, in pixels (both multiples of 8)."""

    min_side: int = 64
    max_side: int = 2048


class GenerateRequest(BaseModel):
    """One generation. Omitted width/height mean the size the server was tuned for; an omitted
    guidance_scale means the pipeline's own default; an omitted seed is drawn by the server and
    returned with the images."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    steps: int = Field(default=DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(
        default=None, ge=GUIDANCE_SCALE.low, le=GUIDANCE_SCALE.high
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="images for this prompt")
    fidelity: str | None = Field(
        default=None,
        description="the worst fidelity class acceptable (bf16 best, then int8, then 4bit); a "
        "server whose plan is of a worse class answers 409",
    )

    @field_validator("fidelity")
    @classmethod
    def _fidelity_class(cls, value: str | None) -> str | None:
        names = [name for name, _bound in FIDELITY_CLASSES]
        if value is not None and value not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")  # the latent grid is 1/8 of the image
        return value


def request_model(limits: SizeLimits) -> type[GenerateRequest]:
    """GenerateRequest with this server's size bounds, so they show in the OpenAPI schema too."""
    side: Any = (int | None, Field(default=None, ge=limits.min_side, le=limits.max_side))
    return create_model("GenerateRequest", __base__=GenerateRequest, width=side, height=side)


@dataclass(frozen=True)
class Generation:
    """A validated request with the server's defaults filled in: what the worker runs."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    seed: int
    n: int
    fidelity: str | None = None  # the worst class acceptable; None: any

    @property
    def batch_key(self) -> tuple[Any, ...]:
        # Requests batch only when one pipeline call can serve them all. Whether a negative
        # prompt is given matters too: SDXL zeroes the unconditional embedding for None but
        # encodes "" — mixing them in one call would change someone's image.
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.negative_prompt is None,
        )


def resolve(request: GenerateRequest, width: int, height: int, seed: int) -> Generation:
    """Fill what the client left out: the tuned size and a server-drawn seed."""
    return Generation(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width or width,
        height=request.height or height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        seed=request.seed if request.seed is not None else seed,
        n=request.n,
        fidelity=request.fidelity,
    )
