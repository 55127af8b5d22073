"""`execute(plan) -> Result`: build each tier of the ladder until one passes its smoke test.

Out-of-memory at load or in the smoke test frees everything and moves one tier down, in the same
process. A tier that cannot run here for another reason is recorded with its error and skipped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.backends import BuildRequest, get_backend
from autoquant.core.console import Log, progress_log
from autoquant.core.errors import AutoquantError
from autoquant.execute import memory
from autoquant.models.types import ModelInventory
from autoquant.planner.plan import Plan, PlannedTier
from autoquant.probe.types import HardwareProfile

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SMOKE_PROMPT = "a photo of an astronaut riding a horse on the moon"
# Flux guidance goes through bf16 (3.5 → 3.504); 4.0 is exact.
_FLUX_GUIDANCE = 4.0

# After a failed tier is freed, CUDA memory should be back where it was (measured: 0–34 MB).
_LEAK_TOLERANCE_BYTES = 64 * 2**20


@dataclass
class Attempt:
    """One tier tried: what happened and what was measured."""

    backend: str
    precision: str
    label: str
    outcome: str  # "chosen", "oom", "error", "unavailable", "skipped"
    phase: str | None = None  # "check", "load" or "smoke": where it failed
    error: str | None = None
    load_seconds: float | None = None
    weights_bytes: int | None = None  # allocated after loading (GPU) / RSS after loading (CPU)
    peak_bytes: int | None = None
    step_seconds: float | None = None
    smoke_seconds: float | None = None
    estimate_bytes: int | None = None
    memory_after_free_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SmokeSettings:
    steps: int = 2
    width: int = 256
    height: int = 256


@dataclass
class Result:
    """The working pipeline and the report of how it was chosen."""

    pipeline: DiffusionPipeline
    plan: Plan
    profile: HardwareProfile
    inventory: ModelInventory
    folder: Path
    chosen_index: int
    attempts: list[Attempt]
    warnings: list[str] = field(default_factory=list)
    adjustments: list[str] = field(default_factory=list)  # what OOM recovery changed later
    cache: dict[str, Any] | None = None  # the tuning cache's verdict, when one was consulted

    @property
    def chosen(self) -> PlannedTier:
        return self.plan.ladder[self.chosen_index]

    def report(self) -> dict[str, Any]:
        attempt = self.attempts[-1]
        return {
            "model": self.plan.model,
            "chosen": {
                "backend": self.chosen.tier.backend,
                "precision": self.chosen.tier.precision,
                "label": self.chosen.label,
                "compute_dtype": self.chosen.tier.compute_dtype,
                "components": list(self.chosen.tier.quantized_components),
                "memory_options": list(self.chosen.tier.memory_options),
                "device_map": self.chosen.device_map,
                "description": get_backend(self.chosen.tier.backend).describe(self.chosen.tier),
            },
            "tried": [a.to_dict() for a in self.attempts],
            "measured": {
                "device": self.plan.device,
                "load_seconds": attempt.load_seconds,
                "weights_bytes": attempt.weights_bytes,
                "peak_bytes": attempt.peak_bytes,
                "step_seconds": attempt.step_seconds,
                "smoke_seconds": attempt.smoke_seconds,
                "estimate_bytes": attempt.estimate_bytes,
            },
            "warnings": list(self.warnings),
            "adjustments": list(self.adjustments),
            "cache": self.cache,
            "probe": self.profile.to_dict(),
            "plan": self.plan.to_dict(),
        }


# Decode in tiles of this many pixels a side. diffusers tiles only images larger than the VAE's
# sample_size, which is 1024 for SDXL and Flux: at 1024² tiling would change nothing.
VAE_TILE_PIXELS = 512


def enable_vae_tiling(vae: Any) -> None:
    vae.enable_tiling()
    if hasattr(vae, "tile_sample_min_size") and vae.tile_sample_min_size > VAE_TILE_PIXELS:
        scale = vae.tile_sample_min_size // vae.tile_latent_min_size
        vae.tile_sample_min_size = VAE_TILE_PIXELS
        vae.tile_latent_min_size = VAE_TILE_PIXELS // scale


def turn_on(pipe: Any, options: Collection[str], device: str) -> None:
    """Switch memory options on for a loaded pipeline, in place."""
    import torch

    if "vae_slicing" in options:
        pipe.vae.enable_slicing()
    if "vae_tiling" in options:
        enable_vae_tiling(pipe.vae)
    if "attention_slicing" in options:
        pipe.enable_attention_slicing()
    if "model_cpu_offload" in options:
        pipe.enable_model_cpu_offload(device=device)
    elif "group_offload" in options:
        enable_group_offload(pipe, torch.device(device))


def enable_group_offload(pipe: Any, onload_device: Any) -> None:
    """Block-level group offload of every component, one block per group, with the text
    encoders streamed layer by layer too (autoquant.models.groups says why)."""
    import torch
    from diffusers.hooks import apply_group_offloading

    from autoquant.models.groups import block_modules

    options: dict[str, Any] = {
        "onload_device": onload_device,
        "offload_type": "block_level",
        "num_blocks_per_group": 1,
    }
    for component in pipe.components.values():
        if hasattr(component, "enable_group_offload"):  # a diffusers model: as the pipeline does
            component.enable_group_offload(**options)
        elif isinstance(component, torch.nn.Module):
            path = block_modules(component, "transformers")
            apply_group_offloading(component, block_modules=path, **options)


def apply_memory_options(pipe: Any, planned: PlannedTier, device: str) -> None:
    """Turn on the tier's memory options and put the pipeline on its device."""
    turn_on(pipe, planned.tier.memory_options, device)
    # Offloading places the components itself; a device map already spread them over GPUs.
    if not planned.tier.offloaded and not planned.device_map:
        pipe.to(device)


def pipeline_call_kwargs(inventory: ModelInventory, pipe: Any, **kwargs: Any) -> dict[str, Any]:
    """Arguments every pipeline family accepts, adjusted per family."""
    call = dict(kwargs)
    if inventory.family == "flux":
        call.setdefault("guidance_scale", _FLUX_GUIDANCE)
        call.pop("negative_prompt", None)
        tokenizer = getattr(pipe, "tokenizer_2", None)
        limit = getattr(tokenizer, "model_max_length", 512)
        call.setdefault("max_sequence_length", min(512, int(limit)))
    return call


def smoke_test(pipe: Any, inventory: ModelInventory, smoke: SmokeSettings) -> tuple[float, float]:
    """A short real generation. Returns (median seconds of one denoiser forward, whole call
    seconds); raises if the output is not finite. Timing the denoiser's own forward (not the gap
    between step callbacks) gives a step time even for a one-step smoke test."""
    import statistics

    import numpy as np
    import torch

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    starts: list[float] = []
    forwards: list[float] = []

    def before(_module: Any, _args: Any) -> None:
        sync()
        starts.append(time.perf_counter())

    def after(_module: Any, _args: Any, _output: Any) -> None:
        sync()
        forwards.append(time.perf_counter() - starts[-1])

    denoiser = getattr(pipe, inventory.denoiser.name)
    hooks = [denoiser.register_forward_pre_hook(before), denoiser.register_forward_hook(after)]
    started = time.perf_counter()
    try:
        with torch.no_grad():
            output = pipe(
                **pipeline_call_kwargs(
                    inventory,
                    pipe,
                    prompt=SMOKE_PROMPT,
                    num_inference_steps=smoke.steps,
                    width=smoke.width,
                    height=smoke.height,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np",
                )
            )
    finally:
        for hook in hooks:
            hook.remove()
    total = time.perf_counter() - started
    images = np.asarray(output.images)
    if not np.isfinite(images).all():
        raise RuntimeError("smoke test produced non-finite pixels")
    return (statistics.median(forwards) if forwards else total), total


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def build_tier(
    planned: PlannedTier,
    *,
    folder: Path,
    inventory: ModelInventory,
    device: str,
    progress: bool,
) -> DiffusionPipeline:
    """Load one tier and make it ready to run (memory options applied, on its device)."""
    backend = get_backend(planned.tier.backend)
    request = BuildRequest(
        folder=folder,
        inventory=inventory,
        tier=planned.tier,
        device=device,
        device_map=planned.device_map,
        progress=progress,
    )
    pipe = backend.load(request)
    backend.post_process(pipe, request)
    apply_memory_options(pipe, planned, device)
    return pipe


def _try_tier(
    planned: PlannedTier,
    *,
    folder: Path,
    inventory: ModelInventory,
    device: str,
    smoke: SmokeSettings,
    progress: bool,
    log: Log,
) -> tuple[DiffusionPipeline | None, Attempt]:
    tier = planned.tier
    attempt = Attempt(
        tier.backend,
        tier.precision,
        planned.label,
        outcome="chosen",
        estimate_bytes=planned.estimate.required_bytes,
    )
    reason = get_backend(tier.backend).unavailable_reason(device)
    if reason:
        attempt.outcome, attempt.phase, attempt.error = "unavailable", "check", reason
        log(f"  skip {planned.label}: {reason}")
        return None, attempt

    log(f"  building {planned.label} on {device} …")
    pipe: DiffusionPipeline | None = None
    phase = "load"
    failure: tuple[str, str] | None = None
    memory.reset_peak(device)
    before = memory.allocated(device)
    started = time.perf_counter()
    try:
        pipe = build_tier(
            planned, folder=folder, inventory=inventory, device=device, progress=progress
        )
        attempt.load_seconds = time.perf_counter() - started
        attempt.weights_bytes = memory.allocated(device)
        phase = "smoke"
        attempt.step_seconds, attempt.smoke_seconds = smoke_test(pipe, inventory, smoke)
        attempt.peak_bytes = memory.peak(device)
    except Exception as err:
        failure = ("oom" if memory.is_oom(err) else "error", _first_line(err))
    if failure is None:
        return pipe, attempt
    # Outside the except block now: the traceback no longer pins the failed tier's tensors.
    pipe = None
    memory.free(device)
    attempt.outcome, attempt.error = failure
    attempt.phase = phase
    attempt.memory_after_free_bytes = memory.allocated(device)
    log(f"  {planned.label} failed at {phase} ({attempt.outcome}): {attempt.error}")
    leaked = attempt.memory_after_free_bytes - before
    if device.startswith("cuda") and leaked > _LEAK_TOLERANCE_BYTES:
        log(f"  warning: {leaked / 2**20:.0f} MiB still allocated after freeing {planned.label}")
    return None, attempt


def execute(
    plan: Plan,
    profile: HardwareProfile,
    *,
    folder: Path | None = None,
    inventory: ModelInventory | None = None,
    smoke: SmokeSettings | None = None,
    start: int = 0,
    skip: Collection[str] = (),
    progress: bool = True,
    log: Log | None = None,
) -> Result:
    """Try the plan's ladder from ``start`` until a tier loads and passes its smoke test.
    Tiers labelled in ``skip`` (known to run out of memory here) are recorded, not built."""
    from autoquant import models

    log = log or progress_log(progress)
    if folder is None or inventory is None:
        source = models.resolve(plan.model)
        folder = folder or models.materialize(source, progress=progress)
        inventory = inventory or models.inventory(source)
    if smoke is None:
        side = min(256, plan.request.width, plan.request.height)
        smoke = SmokeSettings(width=side, height=side)
    attempts: list[Attempt] = []
    warnings: list[str] = []
    for index in range(start, len(plan.ladder)):
        planned = plan.ladder[index]
        if planned.label in skip:
            attempts.append(
                Attempt(
                    planned.tier.backend,
                    planned.tier.precision,
                    planned.label,
                    outcome="skipped",
                    phase="check",
                    error="ran out of memory on this machine before (tuning cache)",
                    estimate_bytes=planned.estimate.required_bytes,
                )
            )
            log(f"  skip {planned.label}: it ran out of memory here before")
            continue
        pipe, attempt = _try_tier(
            planned,
            folder=folder,
            inventory=inventory,
            device=plan.device,
            smoke=smoke,
            progress=progress,
            log=log,
        )
        attempts.append(attempt)
        if pipe is not None:
            warnings.extend(get_backend(planned.tier.backend).warnings())
            log(
                f"  chose {planned.label}: smoke test {attempt.smoke_seconds:.2f} s, "
                f"{attempt.step_seconds:.3f} s/step"
            )
            return Result(pipe, plan, profile, inventory, folder, index, attempts, warnings)
    tried = "; ".join(f"{a.label}: {a.outcome} ({a.error})" for a in attempts)
    raise AutoquantError(f"no tier of {plan.model} could run here: {tried}")
