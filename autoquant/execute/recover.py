"""Generation after tuning, surviving out-of-memory: first cheaper memory options on the same
tier, then one tier down the ladder. Every change is recorded in the result's adjustments."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from autoquant.core.console import Log
from autoquant.execute import memory
from autoquant.execute.build import pipeline_call_kwargs, turn_on
from autoquant.execute.ladder import Result, execute

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Remedies on the same tier, cheapest in speed first.
_REMEDIES: tuple[tuple[str, ...], ...] = (
    ("vae_slicing", "vae_tiling"),
    ("attention_slicing",),
    ("model_cpu_offload",),
)


def _next_remedy(result: Result, applied: set[str]) -> tuple[str, ...] | None:
    present = set(result.chosen.tier.memory_options) | applied
    chosen = result.chosen
    # Offloaded, spread, or on the CPU: nowhere to move to. Nor with the text encoders kept on
    # the CPU: their hooks take inputs there (execute/build.py), while model offload's would
    # move the encoders to the GPU; the next tier is tried instead.
    elsewhere = chosen.tier.offloaded or chosen.tier.cpu_text_encoders or chosen.device_map
    if elsewhere or result.plan.device == "cpu":
        present.add("model_cpu_offload")
    for remedy in _REMEDIES:
        if not set(remedy) <= present:
            return remedy
    return None


def generate(result: Result, log: Log, **call: Any) -> Any:
    """Call the tuned pipeline; on OOM apply the next remedy or tier and call again.
    Returns the pipeline's output. ``result`` is updated in place when the tier changes."""
    applied: set[str] = set()
    # A failed call has already drawn from the caller's generators: rewind them before each retry
    # so the image is the one the seed promises.
    given = call.get("generator")
    generators = [g for g in (given if isinstance(given, list) else [given]) if g is not None]
    states = [g.get_state() for g in generators]
    while True:
        failure: str | None = None
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
        try:
            # No local name for the pipeline: one would outlive this block and keep a failed
            # tier alive while the next one is built.
            kwargs = pipeline_call_kwargs(result.inventory, result.pipeline, **call)
            return _invoke(result.pipeline, kwargs)
        except Exception as err:
            if not memory.is_oom(err):
                raise
            failure = str(err).splitlines()[0] if str(err) else "out of memory"
        memory.free(result.plan.device, keep_compiled=True)  # the tier may run on
        size = f"{call.get('width')}x{call.get('height')}"
        remedy = _next_remedy(result, applied)
        if remedy is not None:
            turn_on(result.pipeline, remedy, result.plan.device)
            applied.update(remedy)
            change = f"out of memory at {size} ({failure}): turned on {', '.join(remedy)}"
        else:
            next_index = result.chosen_index + 1
            if next_index >= len(result.plan.ladder):
                raise memory_exhausted(result, size)
            old = result.chosen.label
            _retire(result)
            memory.free(result.plan.device)
            fresh = execute(
                result.plan,
                result.profile,
                folder=result.folder,
                inventory=result.inventory,
                start=next_index,
                lora=result.lora,
                variant=result.variant,
                progress=False,
                log=log,
            )
            result.pipeline, result.chosen_index = fresh.pipeline, fresh.chosen_index
            result.attempts.extend(fresh.attempts)
            applied.clear()
            change = f"out of memory at {size} with {old}: moved down to {result.chosen.label}"
        result.adjustments.append(change)
        log(f"  {change}")


def _retire(result: Result) -> None:
    """Drop the failed tier before the next one is built, so the two are never in memory
    together. The pipeline object may outlive this (under `guard` it is the user's handle, which
    gets the next tier's contents): empty it, so nothing it holds keeps the weights alive."""
    retired = result.pipeline
    result.pipeline = None  # type: ignore[assignment]
    retired.__dict__.clear()


def _invoke(pipe: Any, kwargs: dict[str, Any]) -> Any:
    cls = type(pipe)
    if getattr(cls, "_autoquant_guarded", False):
        return super(cls, pipe).__call__(**kwargs)  # the pipeline's own call, not the guard
    return pipe(**kwargs)


def _var_keyword(signature: inspect.Signature) -> str | None:
    """The name of a ``**kwargs`` parameter, if the signature has one."""
    kinds = {p.kind: name for name, p in signature.parameters.items()}
    return kinds.get(inspect.Parameter.VAR_KEYWORD)


def memory_exhausted(result: Result, size: str) -> Exception:
    from autoquant.core.errors import AutoquantError

    return AutoquantError(
        f"out of memory at {size} even on the last tier ({result.chosen.label}): "
        "use a smaller size or batch"
    )


def guard(result: Result, log: Log) -> DiffusionPipeline:
    """Make the pipeline's own ``__call__`` recover from OOM the same way (for the loader).

    The instance gets a subclass of its own class whose ``__call__`` goes through
    :func:`generate`; everything else about the pipeline is unchanged."""
    pipe = result.pipeline
    base = type(pipe)

    # Positional arguments mean what they mean to the pipeline's own __call__ (prompt, height,
    # width, steps, … in its order): bind them to its names before going through generate().
    signature = inspect.signature(base.__call__)
    self_name = next(iter(signature.parameters))
    var_keyword = _var_keyword(signature)

    def guarded_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)
        del arguments[self_name]
        extra = arguments.pop(var_keyword, {}) if var_keyword else {}
        output = generate(result, log, **arguments, **extra)
        if result.pipeline is not self:  # moved to another tier: keep the user's handle working
            self.__dict__ = result.pipeline.__dict__
            result.pipeline = self
        return output

    pipe.__class__ = type(
        base.__name__, (base,), {"__call__": guarded_call, "_autoquant_guarded": True}
    )
    return pipe
