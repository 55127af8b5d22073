"""The tier vocabulary every layer shares: a Tier (what to build), the memory options, the
dtypes. Which backends and precisions exist is the registry's (backends/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
