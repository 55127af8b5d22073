"""torchao: int8 weight-only everywhere; float8 (dynamic activations) on compute capability
>= 8.9. Configs are AOBaseConfig objects: diffusers 0.42 rejects the old strings."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend
from autoquant.backends.tier import Tier


def _ao_config(precision: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if precision == "float8":
        return Float8DynamicActivationFloat8WeightConfig()
    return Int8WeightOnlyConfig()


class TorchAo(QuantBackend):
    name = "torchao"
    modules = ("torchao",)
    install_hint = "pip install 'autoquant-diffusers[torchao]'"

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        import transformers

        tier = request.tier
        mapping: dict[str, Any] = {}
        for component in request.inventory.components:
            if component.name not in tier.quantized_components:
                continue
            if component.library == "transformers":
                mapping[component.name] = transformers.TorchAoConfig(quant_type=_ao_config("int8"))
            else:
                mapping[component.name] = diffusers.TorchAoConfig(_ao_config(tier.precision))
        return mapping

    def describe(self, tier: Tier) -> str:
        kind = "float8 dynamic" if tier.precision == "float8" else "int8 weight-only"
        return f"{kind} in {', '.join(tier.quantized_components)}"
