"""The smoke test: a short real generation that proves a built tier runs and times its step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from autoquant.execute.build import pipeline_call_kwargs
from autoquant.models.types import ModelInventory

SMOKE_PROMPT = "a photo of an astronaut riding a horse on the moon"


@dataclass
class SmokeSettings:
    steps: int = 2
    width: int = 256
    height: int = 256


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
