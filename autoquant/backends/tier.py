"""The tier vocabulary: which backend/precision pairs exist and what each costs per weight."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Precisions per backend, in the order a user would read them.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "none": ("bf16", "fp16", "fp32"),
    "quanto": ("int8", "int4", "float8", "mixed"),
    "bitsandbytes": ("nf4", "fp4", "int8"),
    "gguf": ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
    "torchao": ("int8", "float8"),
}
BACKENDS = tuple(PRECISIONS)

# Name of each backend in the probe's `backends` table.
PROBE_NAMES = {
    "quanto": "optimum-quanto",
    "bitsandbytes": "bitsandbytes",
    "gguf": "gguf",
    "torchao": "torchao",
}

# Memory options, in the order the planner reaches for them (cheapest in speed first).
MEMORY_OPTIONS = (
    "vae_slicing",
    "vae_tiling",
    "attention_slicing",
    "model_cpu_offload",
    "group_offload",
)
OFFLOAD_OPTIONS = ("model_cpu_offload", "group_offload")
# vae_tiling decodes in tiles of this many pixels a side. diffusers tiles only images larger than
# the VAE's sample_size, which is 1024 for SDXL and Flux: at 1024² its own tiling changes nothing,
# so the executor lowers the tile to this (execute/build.py) and the estimate counts one tile.
VAE_TILE_PIXELS = 512

COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Tier:
    """One way to build the pipeline: a backend and precision for the denoiser, which components
    are quantized, and which memory options are on."""

    backend: str
    precision: str
    compute_dtype: str  # dtype of everything not quantized, and of the math
    quantized_components: tuple[str, ...] = ()
    memory_options: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        text = f"{self.backend} {self.precision}"
        extras = []
        if len(self.quantized_components) > 1:
            extras.append("text encoders quantized")
        extras.extend(o.replace("_", " ") for o in self.memory_options)
        return text + (f" ({', '.join(extras)})" if extras else "")

    @property
    def offloaded(self) -> bool:
        return any(o in OFFLOAD_OPTIONS for o in self.memory_options)

    def with_options(self, *options: str) -> Tier:
        wanted = set(self.memory_options) | set(options)
        if "group_offload" in options:
            wanted.discard("model_cpu_offload")  # the two offload modes exclude each other
        merged = tuple(o for o in MEMORY_OPTIONS if o in wanted)
        return Tier(
            self.backend, self.precision, self.compute_dtype, self.quantized_components, merged
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "compute_dtype": self.compute_dtype,
            "components": list(self.quantized_components),
            "memory_options": list(self.memory_options),
        }


@dataclass(frozen=True)
class WeightFormat:
    """Bytes a weight costs in memory once loaded, split as quantizers split a model."""

    linear_bytes: float  # per nn.Linear weight parameter the backend quantizes
    quantizes_all_linear: bool = True  # False for GGUF: only in_features % 32 == 0
    activation_factor: float = 1.0  # activation memory relative to bf16 compute
    load_peak_factor: float = 0.0  # load peak as a fraction of the bf16 size (0: no spike)
    # Leaves the class's _keep_in_fp32_modules (T5's "wo") unquantized, at compute precision.
    skips_kept_modules: bool = False
    # Quantizes while loading onto the GPU: with offloading, every quantized component is on the
    # GPU at once until the offload hooks move it off.
    quantizes_on_device: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def _per_block(block_bytes: int, block: int) -> float:
    return block_bytes / block


# Derivations (see ../shared/notes/diffusers-quantization.md and gpu-anchors.md):
# - bitsandbytes NF4/FP4: 4 bits + one fp32 absmax per 64 weights (diffusers' default has no
#   double quantization); int8: 1 byte + per-row fp32 scales (negligible per weight).
# - quanto int4: 4 bits + bf16 scale and shift per group of 128; it first materializes the bf16
#   weights, so loading peaks at about 0.58× the bf16 model (measured 12.35 GiB for Flux-dev).
# - GGUF: Q8_0 is 34 bytes per 32 weights, Q5_1 24, Q5_0 22, Q4_1 20, Q4_0 18.
# - Dynamic-activation fp8 (torchao) and bnb int8 hold quantized copies of activations.
# - transformers' bitsandbytes and quanto quantizers skip _keep_in_fp32_modules; torchao does
#   not (Flux-dev with T5 quantized on an H200: bnb/quanto int8 weights 18.2 GB, torchao 17.2).
QUANT_FORMATS: dict[tuple[str, str], WeightFormat] = {
    ("quanto", "int8"): WeightFormat(1.0, skips_kept_modules=True),
    ("quanto", "mixed"): WeightFormat(1.0, skips_kept_modules=True),
    ("quanto", "float8"): WeightFormat(1.0, skips_kept_modules=True),
    ("quanto", "int4"): WeightFormat(0.5 + 4 / 128, load_peak_factor=0.58, skips_kept_modules=True),
    ("bitsandbytes", "nf4"): WeightFormat(
        0.5 + 4 / 64, skips_kept_modules=True, quantizes_on_device=True
    ),
    ("bitsandbytes", "fp4"): WeightFormat(
        0.5 + 4 / 64, skips_kept_modules=True, quantizes_on_device=True
    ),
    ("bitsandbytes", "int8"): WeightFormat(
        1.0, activation_factor=1.45, skips_kept_modules=True, quantizes_on_device=True
    ),
    ("torchao", "int8"): WeightFormat(1.0),
    ("torchao", "float8"): WeightFormat(1.0, activation_factor=1.8),
    ("gguf", "q8_0"): WeightFormat(_per_block(34, 32), quantizes_all_linear=False),
    ("gguf", "q5_1"): WeightFormat(_per_block(24, 32), quantizes_all_linear=False),
    ("gguf", "q5_0"): WeightFormat(_per_block(22, 32), quantizes_all_linear=False),
    ("gguf", "q4_1"): WeightFormat(_per_block(20, 32), quantizes_all_linear=False),
    ("gguf", "q4_0"): WeightFormat(_per_block(18, 32), quantizes_all_linear=False),
}

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def validate_tier_name(backend: str, precision: str | None) -> None:
    """Raise ValueError with a one-line message for an unknown backend or precision."""
    if backend not in PRECISIONS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS[backend]:
        raise ValueError(
            f"unknown precision {precision!r} for backend {backend!r}: "
            f"choose one of {', '.join(PRECISIONS[backend])}"
        )
