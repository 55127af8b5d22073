"""optimum-quanto: int8/int4/float8 weights, quantized on the fly; runs on CPU and GPU."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend
from autoquant.backends.tier import Tier

# Tier precision → quanto weight dtype. "mixed" is int8 weights with the VAE kept in fp32.
_WEIGHTS = {"int8": "int8", "int4": "int4", "float8": "float8", "mixed": "int8"}


class Quanto(QuantBackend):
    name = "quanto"
    modules = ("optimum.quanto",)
    install_hint = "pip install 'autoquant-diffusers[quanto]'"

    def warnings(self) -> list[str]:
        return ["Quanto is deprecated in diffusers and will be removed in 1.0; it works in 0.42"]

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        import transformers

        tier = request.tier
        weights = _WEIGHTS[tier.precision]
        mapping: dict[str, Any] = {}
        for component in request.inventory.components:
            if component.name not in tier.quantized_components:
                continue
            if component.library == "transformers":
                # Text encoders: transformers' own QuantoConfig, int8 for every tier.
                mapping[component.name] = transformers.QuantoConfig(weights="int8")
            else:
                mapping[component.name] = diffusers.QuantoConfig(weights_dtype=weights)
        return mapping

    def post_process(self, pipe: Any, request: BuildRequest) -> None:
        if request.tier.precision != "mixed":
            return
        import torch

        # The VAE runs in fp32 while the latents arrive in the compute dtype; SD pipelines do not
        # cast them, so cast at the VAE's entry points.
        def to_fp32(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(
                a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a
                for a in args
            )

        for name in ("post_quant_conv", "decoder"):
            module = getattr(pipe.vae, name, None)
            if isinstance(module, torch.nn.Module):
                module.register_forward_pre_hook(to_fp32)

    def describe(self, tier: Tier) -> str:
        text = f"{_WEIGHTS[tier.precision]} weights in {', '.join(tier.quantized_components)}"
        return text + ("; VAE in fp32" if tier.precision == "mixed" else "")
