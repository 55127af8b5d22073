"""The executor on real tiny pipelines: every CPU backend end to end, and OOM fallback."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import autoquant
from autoquant.backends.tier import VAE_TILE_PIXELS
from autoquant.execute import build
from autoquant.execute import ladder as executor
from autoquant.execute.recover import generate
from autoquant.execute.tuning import TuneOptions, tune

CPU_TIERS = [
    ("builtin:tiny-sd", "quanto", "int8"),
    ("builtin:tiny-sd", "quanto", "int4"),
    ("builtin:tiny-sd", "torchao", "int8"),
    ("builtin:tiny-sd", "gguf", "q8_0"),
    ("builtin:tiny-sd", "gguf", "q4_0"),
    ("builtin:tiny-sd", "none", "fp32"),
    ("builtin:tiny-sd", "quanto", "mixed"),
    ("builtin:tiny-flux", "quanto", "int8"),
    ("builtin:tiny-flux", "gguf", "q8_0"),
]


def _quantized(module: torch.nn.Module) -> bool:
    """A Linear layer replaced by a backend's own module, or holding a quantized weight tensor."""
    if not isinstance(module, torch.nn.Linear):
        return False
    weight = module.weight
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype.is_floating_point
    return type(module) is not torch.nn.Linear or not plain


def _options(model: str = "builtin:tiny-sd", **kw: Any) -> TuneOptions:
    return TuneOptions(model=model, device="cpu", progress=False, use_cache=False, **kw)


@pytest.mark.parametrize(("model", "backend", "precision"), CPU_TIERS)
def test_forced_tier_runs_end_to_end(model: str, backend: str, precision: str) -> None:
    result = tune(_options(model, backend=backend, precision=precision))
    assert (result.chosen.tier.backend, result.chosen.tier.precision) == (backend, precision)
    assert result.attempts[-1].outcome == "chosen"
    assert result.attempts[-1].step_seconds and result.attempts[-1].load_seconds
    denoiser = getattr(result.pipeline, result.inventory.denoiser.name)
    assert any(_quantized(m) for m in denoiser.modules()) == (backend != "none")
    images = _two_step_images(result, result.inventory.default_size)
    assert images.shape[-1] == 3 and torch.isfinite(torch.from_numpy(images)).all()


def _two_step_images(result: Any, side: int) -> Any:
    """Two steps of ``result``'s pipeline at ``side``², through the recovering generate."""
    output = generate(
        result,
        lambda _m: None,
        prompt="a cat",
        num_inference_steps=2,
        width=side,
        height=side,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return output.images


def test_bitsandbytes_on_cpu_is_skipped_with_its_reason() -> None:
    result = tune(_options(backend="bitsandbytes", precision="nf4"))
    first = result.attempts[0]
    assert (first.backend, first.outcome, first.phase) == ("bitsandbytes", "unavailable", "check")
    assert "CUDA" in (first.error or "")
    assert result.attempts[-1].outcome == "chosen" and result.chosen.tier.backend != "bitsandbytes"
    assert result.report()["tried"][0]["error"] == first.error


@pytest.mark.parametrize("phase", ["load", "smoke"])
def test_oom_falls_back_one_tier_and_frees_the_failed_pipeline(
    monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    failed: list[weakref.ref[Any]] = []
    real_build = executor.build_tier
    real_smoke = executor.smoke_test

    def build(planned: Any, **kw: Any) -> Any:
        pipe = real_build(planned, **kw)
        if not failed:
            failed.append(weakref.ref(pipe))
            if phase == "load":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pipe

    def smoke(pipe: Any, *args: Any) -> Any:
        if phase == "smoke" and failed and failed[0]() is pipe:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_smoke(pipe, *args)

    monkeypatch.setattr(executor, "build_tier", build)
    monkeypatch.setattr(executor, "smoke_test", smoke)
    result = tune(_options())
    first, last = result.attempts[0], result.attempts[-1]
    assert (first.outcome, first.phase) == ("oom", phase)
    assert "out of memory" in (first.error or "")
    assert last.outcome == "chosen" and result.chosen_index == 1
    assert result.chosen.estimate.required_bytes < result.plan.ladder[0].estimate.required_bytes
    gc.collect()
    assert failed[0]() is None, "the failed tier's pipeline is still alive"


def test_oom_during_generation_turns_on_memory_options_then_moves_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = tune(_options())
    calls = {"n": 0}
    pipe_class = type(result.pipeline)
    real_call = pipe_class.__call__

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:  # vae options, attention slicing, then one tier down
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(pipe_class, "__call__", flaky)
    first_label = result.chosen.label
    output = generate(
        result,
        lambda _m: None,
        prompt="x",
        num_inference_steps=1,
        width=64,
        height=64,
        output_type="np",
    )
    assert output.images.shape[0] == 1
    assert "turned on vae_slicing, vae_tiling" in result.adjustments[0]
    assert "turned on attention_slicing" in result.adjustments[1]
    assert f"with {first_label}: moved down" in result.adjustments[2]
    assert result.chosen_index == 1


def test_load_returns_a_pipeline_with_its_report() -> None:
    pipe = autoquant.load("builtin:tiny-sd", device="cpu", progress=False, use_cache=False)
    report = pipe.autoquant_report
    # On a CPU whose RAM holds it, the unquantized model at the CPU's best dtype is the plan.
    assert report["chosen"]["backend"] == "none"
    assert report["predicted"]["seconds"] > 0 and report["chosen"]["objective"] == "balanced"
    assert {"chosen", "tried", "probe", "plan", "measured"} <= set(report)
    image = pipe("a cat", num_inference_steps=2, width=64, height=64).images[0]
    assert image.size == (64, 64)


def test_vae_tiling_really_tiles_a_1024_vae() -> None:
    """diffusers tiles only images larger than the VAE's sample_size (1024 on SDXL/Flux)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=1024,
    )
    build.enable_vae_tiling(vae)
    assert vae.use_tiling
    assert vae.tile_sample_min_size == VAE_TILE_PIXELS
    assert vae.tile_latent_min_size == VAE_TILE_PIXELS // 2  # two blocks: scale 2


MIXED_TIERS = [
    ("builtin:tiny-flux", "gguf", "q8_0"),  # a GGUF transformer beside int8 text encoders
    ("builtin:tiny-sd", "none", "fp32"),  # an unquantized UNet beside int8 text encoders
]


@pytest.mark.parametrize(("model", "backend", "precision"), MIXED_TIERS)
def test_a_mixed_tier_quantizes_each_part_with_its_own_backend(
    model: str, backend: str, precision: str
) -> None:
    """The pairings backends/*.py `encoder_backends` declare from these runs."""
    from autoquant.backends import backend_class

    assert "torchao" in backend_class(backend).encoder_backends
    overrides = ("force.text_encoders=torchao int8",)
    result = tune(_options(model, backend=backend, precision=precision, overrides=overrides))
    tier = result.chosen.tier
    assert tier.encoders is not None and tier.encoders.backend == "torchao"
    pipe, inv = result.pipeline, result.inventory
    denoiser = getattr(pipe, inv.denoiser.name)
    assert any(_quantized(m) for m in denoiser.modules()) == (backend != "none")
    for encoder in inv.text_encoders:
        weights = [m.weight for m in getattr(pipe, encoder.name).modules() if _quantized(m)]
        assert weights and all("torchao" in type(w).__module__ for w in weights), encoder.name
    report = result.report()["chosen"]
    assert report["encoders"]["backend"] == "torchao"
    assert report["parts"][inv.text_encoders[0].name]["format"] == "torchao int8"
    assert torch.isfinite(torch.from_numpy(_two_step_images(result, 64))).all()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc only")
def test_the_cpu_peak_starts_again_at_each_reset() -> None:
    """A smoke test's CPU peak must not carry the loading's (a cold materialization made one
    64² tiny-sd image read as 394 MiB, and the server batched too few images)."""
    import numpy as np

    from autoquant.execute import memory

    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    high = memory.peak("cpu")
    del block
    memory.reset_peak("cpu")
    assert memory.peak("cpu") < high - 200 * 2**20
