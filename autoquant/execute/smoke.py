"""The smoke test: a short real generation that proves a built tier runs and times its step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from autoquant.execute.build import pipeline_call_kwargs
from autoquant.models.types import ModelInventory

SMOKE_PROMPT = "a photo of an astronaut riding a horse on the moon"


@dataclass
class SmokeSettings:
    steps: int = 2
    width: int = 256
    height: int = 256


@dataclass
class ForwardTimes:
    """Seconds of each forward of a module while ``forward_times`` is active."""

    seconds: list[float] = field(default_factory=list)

    @property
    def first_call_extra(self) -> float | None:
        """What the first forward cost beyond a steady one (the compile, on a compiled
        denoiser), or None with fewer than two forwards."""
        if len(self.seconds) < 2:
            return None
        return max(self.seconds[0] - statistics.median(self.seconds[1:]), 0.0)

    @property
    def median(self) -> float | None:
        """The median forward, or None without any."""
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def steady(self) -> float | None:
        """The median forward after the first, or None with fewer than two."""
        return statistics.median(self.seconds[1:]) if len(self.seconds) > 1 else None


@contextmanager
def forward_times(module: Any) -> Iterator[ForwardTimes]:
    """Time every forward of ``module`` (synchronizing CUDA around each) while active."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    times = ForwardTimes()
    starts: list[float] = []

    def before(_module: Any, _args: Any) -> None:
        sync()
        starts.append(time.perf_counter())

    def after(_module: Any, _args: Any, _output: Any) -> None:
        sync()
        times.seconds.append(time.perf_counter() - starts[-1])

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield times
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class ForwardCounts:
    forwards: int = 0  # the denoiser's forwards
    full: int = 0  # those that ran its last block (a first-block cache skips it)


@contextmanager
def full_forwards(denoiser: Any) -> Iterator[ForwardCounts]:
    """Count the denoiser's forwards, and those that reached its last block, while active. The
    last block is the last of the denoiser's last block list (the first-block cache's tail:
    diffusers hooks/first_block_cache.py takes the blocks in child order); it ran when any of its
    layers did. A denoiser without a block list counts every forward as full."""
    from torch import nn

    counts = ForwardCounts()
    lists = [m for m in denoiser.children() if isinstance(m, nn.ModuleList) and len(m)]
    layers = [m for m in lists[-1][-1].modules() if isinstance(m, nn.Linear)] if lists else []
    marked = [0]  # the forward whose full run was last counted

    def on_forward(*_: Any) -> None:
        counts.forwards += 1
        if not layers:
            counts.full += 1

    def on_layer(*_: Any) -> None:
        if marked[0] != counts.forwards:
            marked[0] = counts.forwards
            counts.full += 1

    hooks = [denoiser.register_forward_pre_hook(on_forward)]
    hooks += [layers[0].register_forward_pre_hook(on_layer)] if layers else []
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def smoke_test(
    pipe: Any, inventory: ModelInventory, smoke: SmokeSettings
) -> tuple[ForwardTimes, float]:
    """A short real generation. Returns each denoiser forward's seconds and the whole call's;
    raises if the output is not finite. Timing the denoiser's own forward (not the gap between
    step callbacks) gives a step time even for a one-step smoke test."""
    import numpy as np
    import torch

    started = time.perf_counter()
    with forward_times(getattr(pipe, inventory.denoiser.name)) as forwards, torch.no_grad():
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
    total = time.perf_counter() - started
    images = np.asarray(output.images)
    if not np.isfinite(images).all():
        raise RuntimeError("smoke test produced non-finite pixels")
    return forwards, total
