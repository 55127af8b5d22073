"""What one request may cost on this machine, checked before it is queued: a request the tuned
pipeline cannot hold in memory (413) or cannot finish in time (422) is refused up front, so it
can neither run the machine out of memory nor hold up every request queued behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autoquant.backends.tier import Tier
from autoquant.core.units import format_bytes
from autoquant.models.types import ModelInventory
from autoquant.planner.estimate import Request, estimate

if TYPE_CHECKING:
    from autoquant.execute.ladder import Result

    # A type only: importing schema imports pydantic (the serve extra), and `autoquant` builds
    # its parser, serve's included, from this module's defaults without it.
    from autoquant.serve.schema import Generation

DEFAULT_MAX_REQUEST_SECONDS = 120.0


@dataclass(frozen=True)
class Refusal:
    status: int  # 413: too much memory; 422: cannot finish in time
    detail: str


@dataclass(frozen=True)
class Admission:
    """The bounds of the tuned pipeline: the planner's memory estimate of a request on the tier
    that runs it against the memory budget, and its predicted seconds against a limit."""

    inventory: ModelInventory
    tier: Tier
    label: str
    on_gpu: bool
    budget_bytes: int
    step_seconds: float  # one denoising step of one image (0: not measured, no time bound) …
    step_size: tuple[int, int]  # … at this width and height
    max_seconds: float

    @classmethod
    def for_result(
        cls, result: Result, step: tuple[float, tuple[int, int]], max_seconds: float
    ) -> Admission:
        """Bounds for ``result``'s tier, with ``step`` the (seconds, size) of one step. The
        budget is the plan's, and never below the estimate of the request it was tuned for:
        the smoke test proved that one runs."""
        chosen = result.chosen
        on_gpu = result.profile.has_gpu
        tuned = estimate(result.inventory, chosen.tier, result.plan.request, on_gpu=on_gpu)
        seconds, size = step
        return cls(
            inventory=result.inventory,
            tier=chosen.tier,
            label=chosen.label,
            on_gpu=on_gpu,
            budget_bytes=max(result.plan.budget_bytes, tuned.required_bytes),
            step_seconds=seconds,
            step_size=size,
            max_seconds=max_seconds,
        )

    def required_bytes(self, generation: Generation) -> int:
        # The tier as it runs the first call: the memory remedies tried after an out-of-memory
        # are not counted, because on the CPU an allocation past free RAM more often ends in
        # the kernel's OOM killer than in an error the server could recover from.
        request = Request(generation.width, generation.height, generation.n, generation.steps)
        return estimate(self.inventory, self.tier, request, on_gpu=self.on_gpu).required_bytes

    def image_seconds(self, generation: Generation) -> float:
        """Predicted seconds of one image: the measured step time scaled by pixels and steps."""
        width, height = self.step_size
        scale = generation.width * generation.height / (width * height)
        return self.step_seconds * scale * generation.steps

    def refusal(self, generation: Generation) -> Refusal | None:
        g = generation
        what = f"{g.width}x{g.height} × {g.n} image{'s' if g.n > 1 else ''}"
        needed = self.required_bytes(g)
        if needed > self.budget_bytes:
            return Refusal(
                413,
                f"{what} needs ~{format_bytes(needed)} on {self.label} (the planner's "
                f"estimate), above the {format_bytes(self.budget_bytes)} this server may use: "
                "ask for a smaller size or fewer images",
            )
        seconds = self.image_seconds(g) * g.n
        if seconds > self.max_seconds:
            return Refusal(
                422,
                f"{what} at {g.steps} steps would take ~{seconds:.0f} s here (measured "
                f"{self.step_seconds:.3f} s per step at {self.step_size[0]}x{self.step_size[1]}), "
                f"above "
                f"--max-request-seconds {self.max_seconds:g}: ask for fewer steps, a smaller "
                "size or fewer images",
            )
        return None

    def images_in_time(self, generation: Generation, max_images: int) -> int:
        """Images of ``generation``'s kind one call may hold and still finish in time (at least
        one: a request alone was admitted)."""
        per_image = self.image_seconds(generation)
        if per_image <= 0:
            return max_images
        return max(1, min(max_images, int(self.max_seconds // per_image)))
