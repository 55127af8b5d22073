"""Recovering from out-of-memory after tuning, and the pipeline `autoquant.load()` returns:
the failed tier is gone before the next one is built, and calls mean what they mean to the
pipeline itself."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import autoquant
from autoquant.execute import ladder
from autoquant.execute.memory import allocator_limit
from autoquant.execute.recover import generate, guard
from autoquant.execute.tuning import TuneOptions, tune


def _tune(model: str = "builtin:tiny-sd") -> Any:
    return tune(TuneOptions(model=model, device="cpu", progress=False, use_cache=False))


@pytest.mark.parametrize("guarded", [False, True], ids=["generate", "guard"])
def test_the_failed_tier_is_freed_before_the_next_is_built(
    monkeypatch: pytest.MonkeyPatch, guarded: bool
) -> None:
    result = _tune()
    first = result.pipeline
    refs = {
        "pipeline": weakref.ref(first),
        "unet": weakref.ref(first.unet),
        "text_encoder": weakref.ref(first.text_encoder),
        "vae": weakref.ref(first.vae),
    }
    base = type(first)
    real_call = base.__call__

    def out_of_memory_on_the_first_tier(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.unet is refs["unet"]():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *args, **kwargs)

    alive_when_building: list[set[str]] = []
    real_build = ladder.build_tier

    def build(planned: Any, **kw: Any) -> Any:
        gc.collect()
        alive_when_building.append({name for name, ref in refs.items() if ref() is not None})
        return real_build(planned, **kw)

    handle = guard(result, lambda _m: None) if guarded else None
    monkeypatch.setattr(base, "__call__", out_of_memory_on_the_first_tier)
    monkeypatch.setattr(ladder, "build_tier", build)
    call = {"num_inference_steps": 1, "width": 64, "height": 64, "output_type": "np"}
    if handle is not None:
        del first
        output = handle("x", **call)
        # The user's handle is the same object throughout; it now holds the next tier.
        assert refs["pipeline"]() is handle and handle.unet is result.pipeline.unet
        expected_alive = {"pipeline"}  # the handle, emptied while the next tier was built
    else:
        del first
        output = generate(result, lambda _m: None, prompt="x", **call)
        expected_alive = set()
    assert output.images.shape == (1, 64, 64, 3)
    assert "moved down" in result.adjustments[-1]
    assert alive_when_building == [expected_alive]


def test_positional_arguments_mean_what_they_mean_to_the_pipeline() -> None:
    pipe = autoquant.load("builtin:tiny-sd", device="cpu", progress=False, use_cache=False)
    steps: list[int] = []

    def count(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(step)
        return kwargs

    generator = torch.Generator("cpu").manual_seed(3)
    out = pipe(
        "a lighthouse", 128, 96, 2, generator=generator, output_type="np",
        callback_on_step_end=count,
    )  # fmt: skip
    assert out.images.shape == (1, 128, 96, 3)  # height 128, width 96
    assert steps == [0, 1]
    # The same call through the pipeline's own __call__, unguarded, gives the same image.
    plain = super(type(pipe), pipe).__call__(  # type: ignore[misc]
        "a lighthouse", 128, 96, 2, generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    )  # fmt: skip
    assert np.array_equal(out.images, plain.images)


def test_a_flux_negative_prompt_reaches_the_pipeline() -> None:
    pipe = autoquant.load("builtin:tiny-flux", device="cpu", progress=False, use_cache=False)

    def image(**kw: Any) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(0)
        call = {"num_inference_steps": 2, "width": 64, "height": 64, "output_type": "np"}
        return np.asarray(pipe("a cat", generator=generator, **call, **kw).images)

    with_negative = image(negative_prompt="a dog", true_cfg_scale=4.0)
    assert not np.array_equal(with_negative, image(true_cfg_scale=4.0))


def test_a_vram_limit_emulates_the_card_with_its_context() -> None:
    # An H200 with 0.65 GiB outside the allocator (context, workspaces) and nothing reserved
    # yet: a 10 GB card leaves the allocator 10 GB − 0.65 GiB, not 10 GB.
    total, outside = 143_771 * 2**20, int(0.65 * 2**30)
    free = total - outside
    assert allocator_limit(10 * 10**9, total, free, reserved_bytes=0) == 10 * 10**9 - outside
    # What the allocator already reserved is inside the cap, not outside it.
    reserved = 2 * 2**30
    assert allocator_limit(10 * 10**9, total, free - reserved, reserved) == 10 * 10**9 - outside


_REAL_OOM_CHILD = """
import json, resource, sys
import psutil, torch
from autoquant.backends.none import NoQuantization
from autoquant.execute.tuning import TuneOptions, tune

real = NoQuantization.post_process

def greedy(self, pipe, request):
    # The fp32 tier asks for more than the address space left: the allocator really fails.
    if request.tier.precision == "fp32":
        torch.ones(8 * 2**30, dtype=torch.uint8)
    return real(self, pipe, request)

NoQuantization.post_process = greedy
cap = psutil.Process().memory_info().vms + 4 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
options = TuneOptions(device="cpu", backend="none", precision="fp32", progress=False,
                      use_cache=False)
result = tune(options)
print(json.dumps([[a.label, a.outcome, a.phase, a.error] for a in result.attempts]))
"""


def test_a_real_cpu_out_of_memory_falls_back_one_tier() -> None:
    """Under RLIMIT_AS a real allocation fails (no faked message): the executor sees an
    out-of-memory, frees the tier and builds the next one in the same process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _REAL_OOM_CHILD],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    attempts = json.loads(done.stdout.strip().splitlines()[-1])
    label, outcome, phase, error = attempts[0]
    assert (label, outcome, phase) == ("none fp32", "oom", "load"), attempts
    assert "can't allocate memory" in error or "MemoryError" in error
    assert attempts[-1][1] == "chosen"
