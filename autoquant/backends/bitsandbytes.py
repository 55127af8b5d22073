"""bitsandbytes NF4/FP4/int8, quantized while loading onto the GPU (diffusers refuses CPU)."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, torch_dtype
from autoquant.backends.tier import Tier


class BitsAndBytes(QuantBackend):
    name = "bitsandbytes"
    modules = ("bitsandbytes",)
    install_hint = "pip install 'autoquant-diffusers[bnb]'"

    def unavailable_reason(self, device: str) -> str | None:
        if not device.startswith(("cuda", "xpu")):
            return (
                "diffusers' bitsandbytes quantizer needs a CUDA or XPU device; "
                "on CPU use gguf, quanto or torchao"
            )
        return super().unavailable_reason(device)

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        import transformers

        tier = request.tier
        compute = torch_dtype(tier.compute_dtype)
        if tier.precision == "int8":
            kwargs: dict[str, Any] = {"load_in_8bit": True}
        else:
            kwargs = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": tier.precision,
                "bnb_4bit_compute_dtype": compute,
            }
        mapping: dict[str, Any] = {}
        for component in request.inventory.components:
            if component.name not in tier.quantized_components:
                continue
            library = transformers if component.library == "transformers" else diffusers
            mapping[component.name] = library.BitsAndBytesConfig(**kwargs)
        return mapping

    def describe(self, tier: Tier) -> str:
        return f"{tier.precision} weights in {', '.join(tier.quantized_components)}"
