"""Text encoders on the CPU beside a GPU denoiser (Tier.cpu_text_encoders): the executor's
hooks, the estimate, the price and when the planner offers it, on made-up machines. The GPU
itself is stood in for by torch's meta device where a tensor must land off the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from machines import INSTALLED
from tiny import tiny_clip, tiny_image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoquant import models
from autoquant.backends import backend_classes
from autoquant.backends.tier import Tier
from autoquant.bench import TierSpec
from autoquant.core.errors import AutoquantError
from autoquant.core.units import GB, GiB
from autoquant.execute.build import build_tier, keep_text_encoders_on_cpu
from autoquant.models import inventory, resolve
from autoquant.planner import load_settings, plan
from autoquant.planner.estimate import Request, estimate
from autoquant.planner.latency import predict
from autoquant.planner.plan import PlannedTier
from autoquant.probe.backends import assess_backends
from autoquant.probe.types import CpuInfo, GpuInfo, HardwareProfile

BF16_CPU = ("avx2", "avx512f", "avx512_bf16")
AVX2_CPU = ("avx2", "fma")


def _card(vram_gb: float, flags: tuple[str, ...] = BF16_CPU) -> HardwareProfile:
    memory = int(vram_gb * GB)
    return HardwareProfile(
        accelerator="cuda",
        gpus=(GpuInfo("NVIDIA H200", memory, memory, "9.0"),),
        driver="580",
        ram_total_bytes=128 * GiB,
        ram_available_bytes=128 * GiB,
        cpu=CpuInfo("made-up host", 16, flags),
        disk_free_bytes=10**12,
        backends=assess_backends("cuda", INSTALLED),
    )


def _plan(profile: HardwareProfile, model: str, *extra: str) -> Any:
    inv = inventory(resolve(model))
    settings = load_settings([], list(extra))
    return plan(profile, inv, settings, Request(inv.default_size, inv.default_size, 1, 20))


def test_the_encoders_run_on_the_cpu_and_hand_their_outputs_to_the_device() -> None:
    clip = tiny_clip()
    inv = inventory(resolve("builtin:tiny-sd"))
    names = [c.name for c in inv.text_encoders]
    assert names == ["text_encoder"]

    class Pipe:  # the attribute a pipeline holds its text encoder in
        text_encoder = clip

    ids = torch.tensor([[0, 5, 7, 1]])
    keep_text_encoders_on_cpu(Pipe, inv, "meta")
    with torch.no_grad():
        output = clip(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert all(p.device.type == "cpu" for p in clip.parameters())
    # Every tensor of the ModelOutput, by attribute and by index, its type kept.
    assert isinstance(output, BaseModelOutputWithPooling)
    assert output.last_hidden_state.is_meta and output[0].is_meta and output.pooler_output.is_meta
    assert all(h.is_meta for h in output.hidden_states)


def test_a_pipeline_with_its_text_encoders_kept_on_the_cpu_makes_the_same_image(
    session_cache: Path,
) -> None:
    source = resolve("builtin:tiny-sd")
    inv = inventory(source)
    folder = models.materialize(source, progress=False)
    request = Request(64, 64, 1, 2)
    images = []
    for on_cpu in (False, True):
        tier = Tier("none", "fp32", "fp32", cpu_text_encoders=on_cpu)
        planned = PlannedTier(tier, estimate(inv, tier, request, on_gpu=True), fits=True)
        pipe = build_tier(planned, folder=folder, inventory=inv, device="cpu", progress=False)
        hooked = bool(pipe.text_encoder._forward_pre_hooks)
        assert hooked == on_cpu
        images.append(tiny_image(pipe))
    assert np.array_equal(images[0], images[1])


def test_the_estimate_moves_the_text_encoders_from_the_card_to_ram() -> None:
    inv = inventory(resolve("builtin:flux-dev"))
    request = Request(1024, 1024, 1, 20)
    resident = Tier("bitsandbytes", "nf4", "bf16", ("transformer",), ("vae_slicing", "vae_tiling"))
    on_cpu = Tier(
        "bitsandbytes",
        "nf4",
        "bf16",
        ("transformer",),
        ("vae_slicing", "vae_tiling"),
        cpu_text_encoders=True,
    )
    both = estimate(inv, resident, request, on_gpu=True)
    split = estimate(inv, on_cpu, request, on_gpu=True)
    encoders = {c.name for c in inv.text_encoders}
    assert set(split.cpu_components) == encoders and not encoders & set(split.components)
    moved = sum(both.components[n] for n in encoders)
    assert split.cpu_components == {n: both.components[n] for n in encoders}  # bf16 both
    assert split.peak_bytes == both.peak_bytes - moved
    assert split.host_bytes == moved
    # On a CPU plan there is no card to keep them off.
    assert estimate(inv, on_cpu, request, on_gpu=False).cpu_components == {}


def test_the_price_is_the_host_cpus_text_encoding() -> None:
    inv = inventory(resolve("builtin:flux-dev"))
    request = Request(1024, 1024, 1, 20)
    tier = Tier("bitsandbytes", "nf4", "bf16", ("transformer",), cpu_text_encoders=True)
    est = estimate(inv, tier, request, on_gpu=True)
    fast, slow = (predict(inv, tier, request, est, _card(10, f)) for f in (BF16_CPU, AVX2_CPU))
    assert fast is not None and slow is not None
    # docs/runs/cpu-text-encoder-avx512/: T5-XXL bf16 8.39 s and CLIP-L 0.05 s a prompt on 2
    # vCPU, so 16 cores take an eighth.
    assert fast.text_seconds == pytest.approx((8.39 + 0.05) * 2 / 16, rel=0.02)
    # bf16 without bf16 units (docs/runs/cpu-text-encoder/: 299 s on 2 vCPU).
    assert slow.text_seconds > 30


def _on_cpu(result: Any) -> list[Any]:
    return [p for p in (result.chosen, *result.ladder) if p.tier.cpu_text_encoders]


def test_the_planner_offers_it_where_the_cpu_has_bf16_units_beside_backends_that_ran_so() -> None:
    chosen = _plan(_card(10), "builtin:flux-dev").chosen
    # Flux-dev at 10 GB: the NF4 transformer resident, T5 on the CPU, against bf16 streamed
    # (docs/runs/2026-12-08-h100-cpu-te/: 5.75 s).
    assert chosen.tier.cpu_text_encoders and chosen.tier.backend == "bitsandbytes"
    assert chosen.parts["text_encoder_2"]["placement"] == "cpu"
    assert chosen.parts["transformer"]["placement"] == "resident"
    for profile, extra in (
        (_card(10), ("components.cpu_text_encoders=never",)),
        (_card(10, AVX2_CPU), ()),  # bf16 without bf16 units: 299 s for T5-XXL on 2 vCPU
        (_card(10), ("planner.optimize=card",)),
        (_card(10), ("planner.compute_dtype=fp16",)),
    ):
        assert not _on_cpu(_plan(profile, "builtin:flux-dev", *extra)), extra
    # Only beside a backend that declares it ran so.
    declared = {b.name for b in backend_classes() if b.beside_cpu_text_encoders}
    assert declared == {"bitsandbytes"}
    offered = _plan(_card(10), "builtin:flux-dev", "planner.ladder_length=100")
    assert {p.tier.backend for p in _on_cpu(offered)} <= declared


def test_the_bench_spells_it() -> None:
    spec = TierSpec.parse("bitsandbytes:nf4+vae_tiling+cpu_text_encoders")
    assert spec.cpu_text_encoders and spec.name == "bitsandbytes:nf4+cpu_text_encoders+vae_tiling"
    inv = inventory(resolve("builtin:flux-dev"))
    tier = spec.tier(inv, "bf16")
    assert tier.cpu_text_encoders and TierSpec.of_tier(tier) == spec
    assert Tier.from_dict(tier.to_dict()) == tier
    for bad in ("torchao:int8+te+cpu_text_encoders", "none:bf16+cpu_text_encoders+group_offload"):
        with pytest.raises(AutoquantError):
            TierSpec.parse(bad)


def test_out_of_memory_never_offloads_a_plan_whose_text_encoders_are_on_the_cpu() -> None:
    from types import SimpleNamespace

    from autoquant.execute.recover import _next_remedy

    applied = {"vae_slicing", "vae_tiling", "attention_slicing"}
    for on_cpu, remedy in ((False, ("model_cpu_offload",)), (True, None)):
        tier = Tier("bitsandbytes", "nf4", "bf16", ("transformer",), cpu_text_encoders=on_cpu)
        result = SimpleNamespace(
            chosen=SimpleNamespace(tier=tier, device_map=None),
            plan=SimpleNamespace(device="cuda:0"),
        )
        assert _next_remedy(result, applied) == remedy  # type: ignore[arg-type]
