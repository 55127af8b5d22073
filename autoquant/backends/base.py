"""The interface every quantization backend implements, and what they share.

Lifecycle per tier (as diffusers' quantizers do it): check the environment → build the
quantization configs → load the pipeline. The executor then applies memory options, moves the
pipeline to its device and smoke-tests it.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.backends.tier import Tier
from autoquant.models.types import ModelInventory

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


@dataclass(frozen=True)
class BuildRequest:
    """Everything a backend needs to build one tier of one model."""

    folder: Path  # a diffusers pipeline folder (model_index.json + components)
    inventory: ModelInventory
    tier: Tier
    device: str  # "cuda:0", "cpu", "mps", …
    device_map: str | None = None  # "balanced": spread components over GPUs
    progress: bool = True


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class QuantBackend(ABC):
    """One way of quantizing a pipeline. Subclasses fill in the three lifecycle steps."""

    name: str
    modules: tuple[str, ...] = ()  # importable modules this backend needs
    install_hint: str = ""

    def unavailable_reason(self, device: str) -> str | None:
        """Why this backend cannot run here, in one sentence a user can act on; None if it can."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} is not installed: {self.install_hint}"
        return None

    def warnings(self) -> list[str]:
        """Caveats to tell the user when this backend is used."""
        return []

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        """Per-component quantization configs (diffusers' for diffusers models, transformers'
        for text encoders), for `PipelineQuantizationConfig(quant_mapping=...)`."""
        return {}

    def components(self, request: BuildRequest) -> dict[str, Any]:
        """Components built outside `from_pretrained` (GGUF's denoiser)."""
        return {}

    def load(self, request: BuildRequest) -> DiffusionPipeline:
        """Load the pipeline for this tier. Components land on the CPU (bitsandbytes puts what it
        quantizes on the GPU itself) unless device_map spreads them over GPUs; the executor
        moves or offloads them afterwards."""
        from diffusers import DiffusionPipeline
        from diffusers.quantizers import PipelineQuantizationConfig

        tier = request.tier
        kwargs: dict[str, Any] = dict(self.components(request))
        mapping = self.quant_mapping(request)
        if mapping:
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
        dtype: Any = torch_dtype(tier.compute_dtype)
        if tier.backend == "none":
            dtype = torch_dtype(tier.precision)
        elif (tier.backend, tier.precision) == ("quanto", "mixed"):
            # "mixed" keeps the VAE in fp32 for decode quality.
            import torch

            dtype = {"vae": torch.float32, "default": dtype}
        if request.device_map:
            kwargs["device_map"] = request.device_map
        pipe = DiffusionPipeline.from_pretrained(
            str(request.folder), dtype=dtype, use_safetensors=True, **kwargs
        )
        pipe.set_progress_bar_config(disable=True)  # the executor reports per tier instead
        return pipe

    def post_process(self, pipe: DiffusionPipeline, request: BuildRequest) -> None:  # noqa: B027
        """Adjust the loaded pipeline before memory options and the smoke test (default: none)."""

    @abstractmethod
    def describe(self, tier: Tier) -> str:
        """What this tier quantizes, in words, for the report."""
