"""GGUF: the denoiser converted to a GGUF file (cached), loaded with `from_single_file` and
passed into the pipeline as a component. Dequantizes per forward (pure torch on CPU)."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, torch_dtype
from autoquant.backends.tier import Tier


class Gguf(QuantBackend):
    name = "gguf"
    modules = ("gguf",)
    install_hint = "pip install 'autoquant-diffusers[gguf]'"

    def components(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        from diffusers import GGUFQuantizationConfig

        from autoquant.backends.gguf.convert import convert_denoiser

        denoiser = request.inventory.denoiser
        converted = convert_denoiser(
            request.folder, request.tier.precision, progress=request.progress
        )
        model_class = getattr(diffusers, denoiser.class_name)
        compute = torch_dtype(request.tier.compute_dtype)
        model = model_class.from_single_file(
            str(converted.path),
            config=str(request.folder),
            subfolder=denoiser.name,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute),
            torch_dtype=compute,
        )
        return {denoiser.name: model}

    def describe(self, tier: Tier) -> str:
        return f"{tier.precision} GGUF denoiser (nn.Linear weights; other tensors F16/F32)"
