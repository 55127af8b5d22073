"""Memory estimates per tier, from parameter counts alone (no weights are loaded).

Bytes per weight come from each backend's declared formats (autoquant/backends/). Calibrated
against the committed H200 measurements in docs/benchmarks/ (SDXL and Flux-dev, every backend);
tests/test_estimate.py holds every one of them to ±10%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoquant.backends import backend_class
from autoquant.backends.base import WeightFormat
from autoquant.backends.tier import DTYPE_BYTES, VAE_TILE_PIXELS, Tier
from autoquant.core.units import GiB
from autoquant.models.types import ComponentInventory, ModelInventory

# Memory outside PyTorch's allocator on a CUDA device (context, cuBLAS workspace): measured
# ~0.65 GB on an H200. A per-process cap does not cover it, and a real card must hold it.
CUDA_CONTEXT_BYTES = int(0.65 * GiB)
# Python, torch and diffusers themselves, on CPU runs (resident set before any weights).
CPU_RUNTIME_BYTES = int(1.0 * GiB)

# Denoiser activation memory per latent pixel and per batch item at a 2-byte compute dtype, the
# peak of one forward above the weights. Measured: SDXL UNet at 1024² batch 2 (CFG) adds
# 0.35 GiB; the Flux-dev transformer at 1024² batch 1 adds 0.49 GiB.
_ACTIVATION_PER_LATENT_PIXEL = {"unet": 11_500, "transformer": 32_000}
# fp32 activations are not quite twice bf16's (measured 1.8× on SDXL, 1.6× on Flux).
_FP32_ACTIVATION_FACTOR = 1.7
# VAE decode peak per output pixel per image at a 2-byte dtype (an SD-style decoder keeps a few
# 128–256-channel maps at full resolution alive). Measured: SDXL's VAE decoding 1024² in bf16
# peaked 2.59 GB above the weights on an H200 (docs/runs/sdxl-1024-vram-limit-6GB.json).
_VAE_DECODE_PER_PIXEL = 2_500
# Allocator rounding and per-tensor padding seen on top of the raw weight bytes (~1%).
_ALLOCATOR_OVERHEAD = 1.01

# Pipelines that run the denoiser on a doubled batch for classifier-free guidance.
CFG_FAMILIES = {"sd", "sdxl", "other"}


@dataclass(frozen=True)
class Request:
    """The generation an estimate is for."""

    width: int
    height: int
    batch: int = 1
    steps: int = 30

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "batch": self.batch,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class Estimate:
    """Estimated memory of one tier on its device (GPU memory, or RAM on CPU), in bytes."""

    components: dict[str, int]  # weights per component once loaded, of those on the device
    denoiser_activation_bytes: int
    vae_decode_bytes: int
    peak_bytes: int  # highest allocation while generating (inside the allocator)
    load_peak_bytes: int  # highest allocation while loading/quantizing
    overhead_bytes: int  # outside the allocator: CUDA context, or the CPU runtime
    host_bytes: int  # weights in system RAM: parked by offloading, or run on the CPU
    # Weights per component of those that run on the CPU beside a GPU (the text encoders under
    # Tier.cpu_text_encoders), counted in host_bytes, not on the device.
    cpu_components: dict[str, int] = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def required_bytes(self) -> int:
        """What the device must have free: the higher of the two peaks plus the overhead."""
        return max(self.peak_bytes, self.load_peak_bytes) + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "components": dict(self.components),
            "weights_bytes": self.weights_bytes,
            "denoiser_activation_bytes": self.denoiser_activation_bytes,
            "vae_decode_bytes": self.vae_decode_bytes,
            "peak_bytes": self.peak_bytes,
            "load_peak_bytes": self.load_peak_bytes,
            "overhead_bytes": self.overhead_bytes,
            "host_bytes": self.host_bytes,
            "cpu_components": dict(self.cpu_components),
            "required_bytes": self.required_bytes,
        }


def component_weight_bytes(
    component: ComponentInventory, fmt: WeightFormat | None, dtype: str
) -> int:
    """Bytes of one component's weights once loaded: what ``fmt`` quantizes at its bytes per
    weight, every other parameter at ``dtype`` (all of them when ``fmt`` is None)."""
    quantized = fmt.quantized_params(component) if fmt else 0
    linear_bytes = fmt.linear_bytes if fmt else 0.0
    raw = quantized * linear_bytes + (component.params - quantized) * DTYPE_BYTES[dtype]
    return int(raw * _ALLOCATOR_OVERHEAD)


def file_bytes(component: ComponentInventory, fmt: WeightFormat) -> int:
    """The size of the file ``fmt`` loads ``component`` from: what it quantizes at its bytes per
    weight, every other parameter at the file's ``file_kept_bytes``."""
    quantized = fmt.quantized_params(component)
    return int(quantized * fmt.linear_bytes + (component.params - quantized) * fmt.file_kept_bytes)


def denoiser_activation_bytes(inventory: ModelInventory, request: Request, tier: Tier) -> int:
    """Peak activation memory of one denoiser forward above its weights."""
    kind = "transformer" if "Transformer" in inventory.denoiser.class_name else "unet"
    latent_pixels = (request.width // inventory.vae_scale_factor) * (
        request.height // inventory.vae_scale_factor
    )
    batch = request.batch * (2 if inventory.family in CFG_FAMILIES else 1)
    per_pixel = _ACTIVATION_PER_LATENT_PIXEL[kind]
    factor = _FP32_ACTIVATION_FACTOR if tier.compute_dtype == "fp32" else 1.0
    fmt = _format(tier)
    if fmt is not None:
        factor *= fmt.activation_factor
    return int(latent_pixels * batch * per_pixel * factor)


def vae_decode_bytes(inventory: ModelInventory, request: Request, tier: Tier) -> int:
    if inventory.vae is None:
        return 0
    pixels = request.width * request.height
    if "vae_tiling" in tier.memory_options:
        pixels = min(pixels, VAE_TILE_PIXELS**2)
    images = 1 if "vae_slicing" in tier.memory_options else request.batch
    factor = 2.0 if _vae_dtype(tier) == "fp32" else 1.0
    return int(pixels * images * _VAE_DECODE_PER_PIXEL * factor)


def _vae_dtype(tier: Tier) -> str:
    return backend_class(tier.backend).vae_dtype(tier.precision, tier.compute_dtype)


def _format(tier: Tier) -> WeightFormat | None:
    return backend_class(tier.backend).format(tier.precision)


def component_format(tier: Tier, component: ComponentInventory) -> tuple[str, str] | None:
    """The (backend, precision) that quantizes ``component`` under ``tier`` (a text encoder's
    precision as its backend gives text encoders), or None where it stays unquantized."""
    for part in tier.parts:
        if component.name in part.quantized_components:
            backend = backend_class(part.backend)
            precision = part.precision
            if component.role == "text_encoder":
                precision = backend.text_encoder_precision(precision)
            return part.backend, precision
    return None


def _component_bytes(inventory: ModelInventory, tier: Tier) -> dict[str, int]:
    backend = backend_class(tier.backend)
    sizes: dict[str, int] = {}
    for component in inventory.components:
        quantized = component_format(tier, component)
        if component.role == "vae":
            sizes[component.name] = component_weight_bytes(component, None, _vae_dtype(tier))
        elif quantized is not None:
            fmt = backend_class(quantized[0]).format(quantized[1])
            sizes[component.name] = component_weight_bytes(component, fmt, tier.compute_dtype)
        else:  # unquantized: at the precision the backend loads it in
            dtype = backend.load_dtype(tier.precision, tier.compute_dtype)
            sizes[component.name] = component_weight_bytes(component, None, dtype)
    return sizes


def estimate(inventory: ModelInventory, tier: Tier, request: Request, *, on_gpu: bool) -> Estimate:
    """Estimate a whole pipeline built as ``tier`` generating ``request``."""
    sizes = _component_bytes(inventory, tier)
    on_cpu: dict[str, int] = {}
    if on_gpu and tier.cpu_text_encoders:
        # Unquantized on the CPU (execute/build.py): in RAM, not on the card.
        for component in inventory.text_encoders:
            del sizes[component.name]
            on_cpu[component.name] = component_weight_bytes(component, None, tier.compute_dtype)
    denoiser = inventory.denoiser.name
    activation = denoiser_activation_bytes(inventory, request, tier)
    decode = vae_decode_bytes(inventory, request, tier)
    vae_name = inventory.vae.name if inventory.vae else None

    def active(name: str) -> int:
        if name == denoiser:
            return activation
        return decode if name == vae_name else 0

    if on_gpu and tier.streamed:
        # A component's groups hold about its share of the weight bytes: quantization shrinks
        # the blocks' Linear layers and the unmatched groups' alike (models/groups.py, which
        # says what streams hold besides).
        streams = tier.placement == "group_offload_streams"

        def resident(name: str, size: int) -> int:
            component = inventory.component(name)
            held = component.group_streamed_params if streams else component.group_resident_params
            return size * held // max(component.params, 1)

        peak = max(resident(name, size) + active(name) for name, size in sizes.items())
    elif on_gpu and "model_cpu_offload" in tier.memory_options:
        peak = max(size + active(name) for name, size in sizes.items())
    else:
        peak = sum(sizes.values()) + max(activation, decode)
    offloaded = on_gpu and tier.offloaded
    host = sum(sizes.values()) if offloaded else 0
    if on_gpu and tier.placement == "group_offload_streams":
        # Streams copy from pinned memory: diffusers pins a second host copy of every weight
        # while setting them up, and the first is freed only after (diffusers' memory docs: 2-3x
        # the model in RAM).
        host *= 2
    host += sum(on_cpu.values())

    fmt = _format(tier)
    load_peak = peak
    if fmt is not None and fmt.load_peak_factor:
        dense_denoiser = component_weight_bytes(inventory.denoiser, None, tier.compute_dtype)
        others = 0 if offloaded else sum(s for n, s in sizes.items() if n != denoiser)
        load_peak = max(peak, others + int(dense_denoiser * fmt.load_peak_factor))
    if not on_gpu and fmt is not None and fmt.file_copies_at_load:
        # The denoiser is built first (backends build it before the pipeline loads the rest).
        # On a GPU this peak is in host RAM, outside the card's budget.
        load_peak = max(load_peak, fmt.file_copies_at_load * file_bytes(inventory.denoiser, fmt))
    for part in tier.parts:
        part_fmt = backend_class(part.backend).format(part.precision)
        if offloaded and part_fmt is not None and part_fmt.quantizes_on_device:
            # Quantized onto the GPU while loading, then moved to the CPU one component at a time
            # (backends/base.py), so the largest one is the load peak. Loaded together, Flux-dev
            # NF4 with T5 quantized peaked at 11.24 GB while loading (docs/benchmarks.md).
            held = (sizes[n] for n in part.quantized_components if n in sizes)
            load_peak = max([load_peak, *held])
    overhead = CUDA_CONTEXT_BYTES if on_gpu else CPU_RUNTIME_BYTES
    return Estimate(
        components=sizes,
        denoiser_activation_bytes=activation,
        vae_decode_bytes=decode,
        peak_bytes=peak,
        load_peak_bytes=load_peak,
        overhead_bytes=overhead,
        host_bytes=host,
        cpu_components=on_cpu,
    )
