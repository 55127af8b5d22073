"""`execute(plan) -> Result`: build each tier of the ladder until one passes its smoke test.

Out-of-memory at load or in the smoke test frees everything and moves one tier down, in the same
process. A tier that cannot run here for another reason is recorded with its error and skipped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.backends import get_backend
from autoquant.core.console import Log, progress_log
from autoquant.core.errors import AutoquantError, error_line
from autoquant.execute import memory
from autoquant.execute.build import build_tier
from autoquant.execute.compile import (
    artifact_path,
    cache_folder,
    load_artifacts,
    save_artifacts,
)
from autoquant.execute.lora import LoraFile, fusion_note, lora_report
from autoquant.execute.smoke import SmokeSettings, smoke_test
from autoquant.models.types import ModelInventory
from autoquant.planner.plan import Plan, PlannedTier
from autoquant.probe.types import HardwareProfile

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

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
    compiled: bool = False
    # The smoke test's first denoiser call beyond a steady one: the compile, on a compiled tier.
    compile_seconds: float | None = None
    compile_cache_warm: bool | None = None  # a saved compile cache was loaded before compiling

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    lora: tuple[LoraFile, ...] = ()  # applied to every tier built, a fallback's too
    variant: str | None = None  # the weights variant loaded (None: standard weights)
    # Where the chosen tier's compile cache is saved (None: an eager tier): a server saves its
    # warm-up's graphs there too (serve/worker.py), so that its next start loads them.
    compile_cache_file: Path | None = None

    @property
    def chosen(self) -> PlannedTier:
        return self.plan.ladder[self.chosen_index]

    def report(self) -> dict[str, Any]:
        """The report of how the tier was chosen. Its figures say what they are: the smoke
        test's step time is ``smoke_step_seconds``, and ``estimate.peak_bytes`` is the estimate
        of ``measured.peak_bytes`` in the same scope: the allocator's peak on CUDA (the context
        is outside it), the process's resident-set peak elsewhere (the runtime is inside it,
        execute/memory.py). ``required_bytes`` is the allocator peak plus that overhead."""
        attempt = self.attempts[-1]
        estimate = self.chosen.estimate
        allocator_peak = max(estimate.peak_bytes, estimate.load_peak_bytes)
        in_allocator = self.plan.device.startswith("cuda")
        return {
            "model": self.plan.model,
            "variant": self.variant,
            "chosen": {
                **self.chosen.tier.to_dict(),
                "label": self.chosen.label,
                "device_map": self.chosen.device_map,
                "description": "; ".join(
                    get_backend(part.backend).describe(part) for part in self.chosen.tier.parts
                ),
                "fidelity": self.chosen.fidelity,
                "objective": self.plan.objective,
                "parts": self.chosen.parts,
            },
            # The latency model's prediction for this tier (planner/latency.py); `generation`
            # (written by the caller that generates) holds the measured seconds beside it.
            "predicted": self.chosen.latency.to_dict() if self.chosen.latency else None,
            "tried": [a.to_dict() for a in self.attempts],
            "measured": {
                "device": self.plan.device,
                "load_seconds": attempt.load_seconds,
                "weights_bytes": attempt.weights_bytes,
                "peak_bytes": attempt.peak_bytes,  # while loading and smoke-testing
                "peak_scope": "allocator" if in_allocator else "process resident set",
                "smoke_step_seconds": attempt.step_seconds,
                "smoke_seconds": attempt.smoke_seconds,
                "compiled": attempt.compiled,
                "compile_seconds": attempt.compile_seconds,
                "compile_cache_warm": attempt.compile_cache_warm,
            },
            "estimate": {
                "peak_bytes": allocator_peak if in_allocator else estimate.required_bytes,
                "allocator_peak_bytes": allocator_peak,
                "overhead_bytes": estimate.overhead_bytes,
                "overhead": "CPU runtime" if self.plan.device == "cpu" else "CUDA context",
                "required_bytes": estimate.required_bytes,
            },
            "lora": lora_report(self.lora, self.chosen.tier, self.chosen.label),
            "warnings": list(self.warnings),
            "adjustments": list(self.adjustments),
            "cache": self.cache,
            "probe": self.profile.to_dict(),
            "plan": self.plan.to_dict(),
        }


def _gguf_file(plan: Plan) -> Path | None:
    """The user's GGUF file of the denoiser the plan was made for (--gguf), if any."""
    path = plan.settings["force"].get("gguf")
    return Path(path) if path else None


def _try_tier(
    planned: PlannedTier,
    *,
    folder: Path,
    inventory: ModelInventory,
    device: str,
    smoke: SmokeSettings,
    progress: bool,
    log: Log,
    lora: Sequence[LoraFile] = (),
    variant: str | None = None,
    gguf_file: Path | None = None,
    compile_cache: Path,
) -> tuple[DiffusionPipeline | None, Attempt]:
    """Build and smoke-test one tier. A compiled tier loads its compile cache from the folder
    ``compile_cache`` first when there is one, smoke-tests with two steps at least (the first
    call compiles; the second is its step), and saves what it compiled there after."""
    tier = planned.tier
    attempt = Attempt(
        tier.backend,
        tier.precision,
        planned.label,
        outcome="chosen",
        estimate_bytes=planned.estimate.required_bytes,
        compiled=tier.compiled,
    )
    reason = next(
        filter(
            None,
            (get_backend(t.backend).unavailable_reason(device, t.precision) for t in tier.parts),
        ),
        None,
    )
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
    artifacts = artifact_path(compile_cache, planned.label)
    if tier.compiled:
        attempt.compile_cache_warm = load_artifacts(artifacts)
        smoke = dataclasses.replace(smoke, steps=max(smoke.steps, 2))
    started = time.perf_counter()
    try:
        pipe = build_tier(
            planned,
            lora=lora,
            folder=folder,
            inventory=inventory,
            device=device,
            progress=progress,
            variant=variant,
            gguf_file=gguf_file,
        )
        attempt.load_seconds = time.perf_counter() - started
        attempt.weights_bytes = memory.allocated(device)
        phase = "smoke"
        forwards, attempt.smoke_seconds = smoke_test(pipe, inventory, smoke)
        attempt.step_seconds = forwards.median or attempt.smoke_seconds
        attempt.peak_bytes = memory.peak(device)
        if tier.compiled:
            # The smoke test's median step would carry half the compile: the steady one.
            attempt.step_seconds = forwards.steady
            attempt.compile_seconds = forwards.first_call_extra
            save_artifacts(artifacts)
    except Exception as err:
        failure = ("oom" if memory.is_oom(err) else "error", error_line(err))
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
    lora: Sequence[LoraFile] = (),
    variant: str | None = None,
) -> Result:
    """Try the plan's ladder from ``start`` until a tier loads and passes its smoke test.
    Tiers labelled in ``skip`` (known to run out of memory here) are recorded, not built.
    ``variant``: the weights variant to load (models/variant.py; None: the folder's own)."""
    from autoquant import models

    log = log or progress_log(progress)
    if folder is None or inventory is None:
        source = models.resolve(plan.model)
        folder = folder or models.materialize(source, progress=progress, variant=variant)
        inventory = inventory or models.inventory(source)
    if smoke is None:
        side = min(256, plan.request.width, plan.request.height)
        smoke = SmokeSettings(width=side, height=side)
    # The smoke test compiles for its own size, one image (execute/compile.py).
    compile_folder = cache_folder(
        profile, inventory, width=smoke.width, height=smoke.height, batch=1
    )
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
            lora=lora,
            folder=folder,
            inventory=inventory,
            device=plan.device,
            smoke=smoke,
            progress=progress,
            log=log,
            variant=variant,
            gguf_file=_gguf_file(plan),
            compile_cache=compile_folder,
        )
        attempts.append(attempt)
        if index == 0 and plan.forced and attempt.outcome == "error":
            # The user asked for this tier and it broke (a corrupt file, a library error):
            # another tier in its place would be a silent substitute. Running out of memory, or a
            # backend that cannot run here at all, still falls back, as the plan's path says.
            raise AutoquantError(
                f"the forced tier {planned.label} failed at {attempt.phase}: {attempt.error}"
            )
        if pipe is not None:
            for part in planned.tier.parts:
                warnings.extend(
                    w for w in get_backend(part.backend).warnings() if w not in warnings
                )
            if planned.tier.first_block_cache is not None:
                warnings.append(
                    f"first-block cache {planned.tier.first_block_cache:g} on: lossy beyond the "
                    f"{planned.fidelity} class of its format, and not in the predicted seconds "
                    "(its measured cost: docs/benchmarks.md)"
                )
            compiled = (
                f", compiled in {attempt.compile_seconds:.1f} s"
                f" ({'warm' if attempt.compile_cache_warm else 'cold'} cache)"
                if attempt.compile_seconds is not None
                else ""
            )
            log(
                f"  chose {planned.label}: smoke test {attempt.smoke_seconds:.2f} s, "
                f"{attempt.step_seconds:.3f} s/step{compiled}"
            )
            if lora:
                log(f"  {fusion_note(planned.tier, planned.label)}")
            return Result(
                pipe,
                plan,
                profile,
                inventory,
                folder,
                index,
                attempts,
                warnings,
                variant=variant,
                lora=tuple(lora),
                compile_cache_file=(
                    artifact_path(compile_folder, planned.label) if planned.tier.compiled else None
                ),
            )
    tried = "; ".join(f"{a.label}: {a.outcome} ({a.error})" for a in attempts)
    raise AutoquantError(f"no tier of {plan.model} could run here: {tried}")
