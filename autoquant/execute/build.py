"""Build one tier: load it through its backend, switch on its memory options, put it on its
device; and the call arguments every pipeline family takes."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.backends import BuildRequest, get_backend
from autoquant.backends.tier import VAE_TILE_PIXELS
from autoquant.execute.compile import compile_denoiser
from autoquant.execute.lora import LoraFile, apply_lora
from autoquant.models.types import ModelInventory
from autoquant.planner.latency import compile_figure
from autoquant.planner.plan import PlannedTier

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Flux guidance goes through bf16 (3.5 → 3.504); 4.0 is exact.
_FLUX_GUIDANCE = 4.0


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
    elif "group_offload_streams" in options:
        enable_group_offload(pipe, torch.device(device), streams=True)
    elif "group_offload" in options:
        enable_group_offload(pipe, torch.device(device), streams=False)


def enable_group_offload(pipe: Any, onload_device: Any, *, streams: bool) -> None:
    """Block-level group offload of every component, one block per group, with the text
    encoders streamed layer by layer too (autoquant.models.groups says why). ``streams``: the
    weights are pinned in host memory and each next group is copied on a CUDA stream while the
    current one computes (diffusers' use_stream).

    With streams, a component whose blocks sit below named ``block_modules`` (the text
    encoders' layer stacks) is offloaded leaf by leaf instead: diffusers 0.42.1 registers a
    prefetch hook at every level it recurses into, and the outer one then fails on the inner
    one's trackers ("Hook with name layer_execution_tracker already exists in the registry",
    Flux-dev on an H200, docs/benchmarks.md); leaf level recurses into nothing. The VAE streams
    without CUDA streams: the prefetch order is learnt in the module's first forward, and the
    pipeline calls the VAE's decode, never its forward (diffusers warns the same of tiling).
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    from autoquant.models.groups import block_modules

    vae = getattr(pipe, "vae", None)
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        library = "diffusers" if hasattr(component, "enable_group_offload") else "transformers"
        path = block_modules(component, library)
        stream = streams and component is not vae
        if stream and path:
            apply_group_offloading(
                component, onload_device, offload_type="leaf_level", use_stream=True
            )
        else:
            apply_group_offloading(
                component,
                onload_device,
                offload_type="block_level",
                num_blocks_per_group=1,
                block_modules=path,
                use_stream=stream,
            )


def enable_first_block_cache(pipe: Any, inventory: ModelInventory, threshold: float) -> None:
    """diffusers' first-block cache on the denoiser (models/step_cache.py). Its state lives per
    pipeline call: the pipeline sets the cache context at each step and resets it when the call
    ends (maybe_free_model_hooks), so one call's residuals never leak into the next."""
    from diffusers.hooks import FirstBlockCacheConfig

    getattr(pipe, inventory.denoiser.name).enable_cache(FirstBlockCacheConfig(threshold=threshold))


def keep_text_encoders_on_cpu(pipe: Any, inventory: ModelInventory, device: str) -> None:
    """The text encoders stay on the CPU (Tier.cpu_text_encoders) while the rest runs on
    ``device``: each takes its inputs to the CPU, and gives its outputs back on ``device``,
    where the pipeline builds the prompt embeddings (diffusers' _execution_device is the
    accelerator when components are split: DiffusionPipeline.device). accelerate's
    send_to_device moves the tensors inside tuples, dicts and ModelOutputs, keeping their types."""
    import torch
    from accelerate.utils import send_to_device

    cpu, target = torch.device("cpu"), torch.device(device)

    def inputs_to_cpu(_module: Any, args: Any, kwargs: Any) -> Any:
        return send_to_device(args, cpu), send_to_device(kwargs, cpu)

    def outputs_to_device(_module: Any, _args: Any, _kwargs: Any, output: Any) -> Any:
        return send_to_device(output, target)

    for component in inventory.text_encoders:
        encoder = getattr(pipe, component.name)
        encoder.to(cpu)
        encoder.register_forward_pre_hook(inputs_to_cpu, with_kwargs=True)
        encoder.register_forward_hook(outputs_to_device, with_kwargs=True)


def apply_memory_options(
    pipe: Any, planned: PlannedTier, device: str, inventory: ModelInventory
) -> None:
    """Turn on the tier's memory options and put the pipeline on its device (its text encoders
    on the CPU where the tier says)."""
    import torch

    turn_on(pipe, planned.tier.memory_options, device)
    # Offloading places the components itself; a device map already spread them over GPUs.
    if planned.tier.offloaded or planned.device_map:
        return
    if not planned.tier.cpu_text_encoders:
        pipe.to(device)
        return
    keep_text_encoders_on_cpu(pipe, inventory, device)
    on_cpu = {c.name for c in inventory.text_encoders}
    for name, component in pipe.components.items():
        if name not in on_cpu and isinstance(component, torch.nn.Module):
            component.to(device)


def pipeline_call_kwargs(inventory: ModelInventory, pipe: Any, **kwargs: Any) -> dict[str, Any]:
    """The caller's arguments, with per-family defaults where the caller gave none (Flux's
    guidance and sequence length). Nothing the caller gave is dropped: Flux takes a
    ``negative_prompt`` too (it applies with ``true_cfg_scale`` > 1)."""
    call = dict(kwargs)
    if inventory.family == "flux":
        call.setdefault("guidance_scale", _FLUX_GUIDANCE)
        tokenizer = getattr(pipe, "tokenizer_2", None)
        limit = getattr(tokenizer, "model_max_length", 512)
        call.setdefault("max_sequence_length", min(512, int(limit)))
    return call


def build_tier(
    planned: PlannedTier,
    *,
    folder: Path,
    inventory: ModelInventory,
    device: str,
    progress: bool,
    lora: Sequence[LoraFile] = (),
    variant: str | None = None,
    gguf_file: Path | None = None,
) -> DiffusionPipeline:
    """Load one tier and make it ready to run (``lora`` applied, memory options applied, on its
    device). The LoRA goes in before the memory options: offload hooks come after it, never
    taken apart and put back by diffusers' loader. ``variant``: the weights variant asked for
    (None: the one the folder ships instead of standard weights, if any). ``gguf_file``: the
    user's GGUF file of the denoiser (--gguf), which a gguf tier loads instead of converting.
    A tier with a first-block cache gets it after its memory options; a compiled tier's denoiser
    is compiled last, on its device (its first call then compiles: execute/compile.py)."""
    from autoquant.models.variant import weights_variant

    backend = get_backend(planned.tier.backend)
    request = BuildRequest(
        folder=folder,
        inventory=inventory,
        tier=planned.tier,
        device=device,
        device_map=planned.device_map,
        progress=progress,
        variant=weights_variant(folder, variant),
        gguf_file=gguf_file if planned.tier.backend == "gguf" else None,
    )
    encoders = planned.tier.encoders
    pipe = backend.load(request, get_backend(encoders.backend) if encoders else None)
    backend.post_process(pipe, request)
    apply_lora(pipe, lora, planned.tier, planned.label)
    apply_memory_options(pipe, planned, device, inventory)
    if planned.tier.first_block_cache is not None:
        enable_first_block_cache(pipe, inventory, planned.tier.first_block_cache)
    if planned.tier.compiled:
        figure = compile_figure(
            inventory, planned.tier, on_gpu=device.startswith("cuda"), nearest=True
        )
        assert figure is not None  # nearest always gives one
        compile_denoiser(
            getattr(pipe, inventory.denoiser.name), scope=figure.scope, mode=figure.mode
        )
    return pipe
