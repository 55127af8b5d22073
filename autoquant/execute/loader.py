"""`autoquant.load(model, **options) -> DiffusionPipeline`: the whole agent as one call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoquant.core.console import progress_log
from autoquant.execute.recover import guard
from autoquant.execute.tuning import DEFAULT_MODEL, TuneOptions, tune

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def load(
    model: str = DEFAULT_MODEL, *, oom_guard: bool = True, **options: Any
) -> DiffusionPipeline:
    """Probe, plan, build and smoke-test ``model``; return the working pipeline.

    ``options`` are :class:`autoquant.execute.tuning.TuneOptions` fields (``profiles``,
    ``overrides``, ``backend``, ``precision``, ``vram_limit``, ``width``, ``height``,
    ``smoke_steps``, …).
    The report is attached as ``pipe.autoquant_report``. With ``oom_guard`` the pipeline's calls
    recover from out-of-memory (memory options first, then one tier down) and say what changed.
    """
    tune_options = TuneOptions(model=model, **options)

    log = progress_log(tune_options.progress)
    result = tune(tune_options, log=log)
    pipe = guard(result, log) if oom_guard else result.pipeline
    # Pipelines are plain objects: the report rides along as an attribute users can read.
    setattr(pipe, "autoquant_report", result.report())  # noqa: B010
    return pipe
