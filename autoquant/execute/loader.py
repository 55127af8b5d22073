"""`autoquant.load(model, **options) -> DiffusionPipeline`: the whole agent as one call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoquant.core.console import progress_log
from autoquant.execute.lora import lora_files
from autoquant.execute.recover import guard
from autoquant.execute.tuning import DEFAULT_MODEL, TuneOptions, tune

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def load(
    model: str = DEFAULT_MODEL, *, oom_guard: bool = True, lora: Any = None, **options: Any
) -> DiffusionPipeline:
    """Probe, plan, build and smoke-test ``model``; return the working pipeline.

    ``model`` is what ``-m`` takes (a single ``.safetensors`` checkpoint too, with ``config=`` a
    diffusers folder or ``builtin:NAME`` where its architecture is not the matching built-in).
    ``options`` are :class:`autoquant.execute.tuning.TuneOptions` fields (``profiles``,
    ``overrides``, ``backend``, ``precision``, ``variant``, ``vram_limit``, ``width``, ``height``,
    ``smoke_steps``, ``gguf`` (the user's GGUF file of the denoiser), ``compile`` ("auto",
    "always" or "never": planner.compile), ``expected_images`` (planner.expected_images), …).
    ``lora``: a LoRA safetensors file, a ``(path, scale)`` pair, or a list of either, applied
    to the tier before its smoke test (fused where its backend can fuse; the report says which).
    The report is attached as ``pipe.autoquant_report``. With ``oom_guard`` the pipeline's calls
    recover from out-of-memory (memory options first, then one tier down) and say what changed.
    """
    tune_options = TuneOptions(model=model, lora=lora_files(lora), **options)

    log = progress_log(tune_options.progress)
    result = tune(tune_options, log=log)
    pipe = guard(result, log) if oom_guard else result.pipeline
    # Pipelines are plain objects: the report rides along as an attribute users can read.
    setattr(pipe, "autoquant_report", result.report())  # noqa: B010
    return pipe
