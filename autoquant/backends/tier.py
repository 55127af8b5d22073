"""The tier vocabulary every layer shares: a Tier (what to build), the memory options, the
dtypes. Which backends and precisions exist is the registry's (backends/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Memory options, in the order the planner reaches for them (cheapest in speed first). Each
# offload option is a placement of the whole pipeline's weights: swapped in per component for its
# phase (model_cpu_offload), or streamed block by block on every step, from pinned memory with
# CUDA streams overlapping the copies (group_offload_streams) or from pageable memory without
# (group_offload, which needs no second host copy).
MEMORY_OPTIONS = (
    "vae_slicing",
    "vae_tiling",
    "attention_slicing",
    "model_cpu_offload",
    "group_offload_streams",
    "group_offload",
)
OFFLOAD_OPTIONS = ("model_cpu_offload", "group_offload_streams", "group_offload")
GROUP_OFFLOAD_OPTIONS = ("group_offload_streams", "group_offload")
# vae_tiling decodes in tiles of this many pixels a side. diffusers tiles only images larger than
# the VAE's sample_size, which is 1024 for SDXL and Flux: at 1024² its own tiling changes nothing,
# so the executor lowers the tile to this (execute/build.py) and the estimate counts one tile.
VAE_TILE_PIXELS = 512

COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class EncoderFormat:
    """Text encoders quantized by another backend than the denoiser's (a GGUF or unquantized
    denoiser beside an NF4 or int8 T5): that backend, its precision, and the components."""

    backend: str
    precision: str
    components: tuple[str, ...]

    @property
    def name(self) -> str:
        """``backend:precision``, as profiles and tier specs write it."""
        return f"{self.backend}:{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "components": list(self.components),
        }


@dataclass(frozen=True)
class Tier:
    """One way to build the pipeline: a backend and precision for the denoiser, which components
    that backend quantizes, the text encoders' own format when another backend quantizes them,
    and which memory options are on."""

    backend: str
    precision: str
    compute_dtype: str  # dtype of everything not quantized, and of the math
    quantized_components: tuple[str, ...] = ()  # what ``backend`` quantizes
    memory_options: tuple[str, ...] = ()
    encoders: EncoderFormat | None = None
    # The denoiser compiled (execute/compile.py: its repeated blocks where its class declares
    # them, else whole); resident tiers only (planner/plan.py says why).
    compiled: bool = False
    # The denoiser's first-block cache threshold (models/step_cache.py); None: every step runs
    # in full. Lossy, opt-in only (planner.cache).
    first_block_cache: float | None = None
    # The text encoders run on the CPU beside a GPU denoiser, unquantized at the compute dtype
    # (components.cpu_text_encoders; execute/build.py); else they go where the rest go.
    cpu_text_encoders: bool = False

    @property
    def label(self) -> str:
        text = f"{self.backend} {self.precision}"
        extras = []
        if self.encoders is not None:
            extras.append(f"text encoders {self.encoders.backend} {self.encoders.precision}")
        elif len(self.quantized_components) > 1:
            extras.append("text encoders quantized")
        extras += ["text encoders on the CPU"] if self.cpu_text_encoders else []
        extras.extend(o.replace("_", " ") for o in self.memory_options)
        extras += ["compiled"] if self.compiled else []
        if self.first_block_cache is not None:
            extras.append(f"first-block cache {self.first_block_cache:g}")
        return text + (f" ({', '.join(extras)})" if extras else "")

    @property
    def encoders_quantized(self) -> bool:
        """Whether the text encoders are quantized, by the denoiser's backend or another."""
        return self.encoders is not None or len(self.quantized_components) > 1

    @property
    def parts(self) -> tuple[Tier, ...]:
        """The tier itself, then its text encoders' tier when another backend builds them."""
        encoders = self.encoder_tier()
        return (self,) if encoders is None else (self, encoders)

    def encoder_tier(self) -> Tier | None:
        """The text encoders' part as a tier of their backend (what it builds), or None."""
        if self.encoders is None:
            return None
        return Tier(
            self.encoders.backend,
            self.encoders.precision,
            self.compute_dtype,
            self.encoders.components,
            self.memory_options,
        )

    @property
    def offloaded(self) -> bool:
        return any(o in OFFLOAD_OPTIONS for o in self.memory_options)

    @property
    def placement(self) -> str:
        """Where the weights live while generating: "resident", or the offload option."""
        return next((o for o in self.memory_options if o in OFFLOAD_OPTIONS), "resident")

    @property
    def streamed(self) -> bool:
        return self.placement in GROUP_OFFLOAD_OPTIONS

    def with_options(self, *options: str) -> Tier:
        wanted = set(self.memory_options) | set(options)
        for offload in OFFLOAD_OPTIONS:  # one placement at a time: the last asked for wins
            if offload in options:
                wanted -= set(OFFLOAD_OPTIONS) - {offload}
        return replace(self, memory_options=tuple(o for o in MEMORY_OPTIONS if o in wanted))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tier:
        """The tier a ``to_dict`` (a report's ``chosen``, a bench record's ``tier``) describes."""
        encoders = data.get("encoders")  # absent in records written before it existed
        return cls(
            data["backend"],
            data["precision"],
            data["compute_dtype"],
            tuple(data["components"]),
            tuple(data["memory_options"]),
            EncoderFormat(encoders["backend"], encoders["precision"], tuple(encoders["components"]))
            if encoders
            else None,
            bool(data.get("compiled", False)),  # absent in records written before it existed
            data.get("first_block_cache"),  # likewise
            bool(data.get("cpu_text_encoders", False)),  # likewise
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "compute_dtype": self.compute_dtype,
            "components": list(self.quantized_components),
            "memory_options": list(self.memory_options),
            "encoders": self.encoders.to_dict() if self.encoders else None,
            "compiled": self.compiled,
            "first_block_cache": self.first_block_cache,
            "cpu_text_encoders": self.cpu_text_encoders,
        }


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
