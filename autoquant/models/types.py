"""Plain data describing a model source and its components; no torch or diffusers imports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SourceKind = Literal["builtin", "local", "hub"]
Role = Literal["denoiser", "text_encoder", "vae"]
Family = Literal["sd", "sdxl", "flux", "other"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, as resolved from what the user typed."""

    spec: str  # exactly what the user wrote: "builtin:tiny-sd", "./my-model", "org/repo"
    kind: SourceKind
    name: str  # built-in name ("tiny-sd"), absolute folder path, or hub repo id

    @property
    def local_path(self) -> Path | None:
        return Path(self.name) if self.kind == "local" else None


@dataclass(frozen=True)
class ComponentInventory:
    """Parameter counts of one pipeline component, split the way quantizers see them."""

    name: str  # pipeline attribute: "unet", "transformer", "text_encoder", "text_encoder_2", "vae"
    role: Role
    library: str  # "diffusers" or "transformers"
    class_name: str
    params: int  # every parameter
    linear_params: int  # weights of nn.Linear modules: what diffusers' quantizers replace
    # nn.Linear weight parameters per in_features, as (in_features, params) pairs: block
    # quantizers (GGUF) take only rows that are a multiple of their block.
    linear_in_features: tuple[tuple[int, int], ...]
    # The subset of linear_params in the class's _keep_in_fp32_modules (T5's "wo"), which the
    # bitsandbytes and quanto quantizers leave unquantized.
    kept_linear_params: int
    # What block-level group offload keeps on the device at once, without and with CUDA streams
    # (models/groups.py).
    group_resident_params: int
    group_streamed_params: int

    def linear_params_in_blocks(self, block: int) -> int:
        """The nn.Linear weights whose in_features is a multiple of ``block``."""
        return sum(params for width, params in self.linear_in_features if width % block == 0)

    @property
    def other_params(self) -> int:
        """Parameters that stay at compute precision under every quantizer (conv, norm, bias,
        embeddings)."""
        return self.params - self.linear_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "library": self.library,
            "class_name": self.class_name,
            "params": self.params,
            "linear_params": self.linear_params,
            "linear_in_features": [list(pair) for pair in self.linear_in_features],
            "kept_linear_params": self.kept_linear_params,
            "group_resident_params": self.group_resident_params,
            "group_streamed_params": self.group_streamed_params,
        }


@dataclass(frozen=True)
class ModelInventory:
    """What the planner needs to know about a model without loading its weights."""

    source: ModelSource
    family: Family
    pipeline_class: str  # model_index.json's _class_name, e.g. "StableDiffusionXLPipeline"
    components: tuple[ComponentInventory, ...]
    default_size: int  # native resolution in pixels (512 for SD1.5, 1024 for SDXL/Flux)
    vae_scale_factor: int  # pixels per latent pixel (8)

    @property
    def denoiser(self) -> ComponentInventory:
        return next(c for c in self.components if c.role == "denoiser")

    @property
    def text_encoders(self) -> tuple[ComponentInventory, ...]:
        return tuple(c for c in self.components if c.role == "text_encoder")

    @property
    def vae(self) -> ComponentInventory | None:
        return next((c for c in self.components if c.role == "vae"), None)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)

    def component(self, name: str) -> ComponentInventory:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.source.spec,
            "family": self.family,
            "pipeline_class": self.pipeline_class,
            "default_size": self.default_size,
            "vae_scale_factor": self.vae_scale_factor,
            "params": self.params,
            "components": [c.to_dict() for c in self.components],
        }
