"""torchao: int8 weight-only everywhere; float8 (dynamic activations) on compute capability
>= 8.9. Configs are AOBaseConfig objects: diffusers 0.42 rejects the old strings."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, WeightFormat
from autoquant.backends.tier import Tier

# Text encoders get int8 weight-only through transformers' TorchAoConfig.
_TEXT_ENCODER_PRECISION = "int8"


def _ao_config(precision: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if precision == "float8":
        # Row-wise scales (one per output channel of the weight, one per token of the
        # activation): the granularity the speed figure was measured with
        # (../shared/notes/speed-levers.md; diffusers-torchao's fastest Flux setup).
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int8WeightOnlyConfig()


class TorchAo(QuantBackend):
    name = "torchao"
    precisions = ("int8", "float8")
    # torchao quantizes T5's _keep_in_fp32_modules too (unlike bitsandbytes and quanto); dynamic
    # fp8 holds quantized copies of the activations.
    formats = {
        "int8": WeightFormat(1.0),
        "float8": WeightFormat(1.0, activation_factor=1.8),
    }
    distribution = "torchao"
    module = "torchao"
    minimum_version = "0.15.0"
    extra = "torchao"
    loggers = ("torchao",)
    fp8_precisions = ("float8",)
    # Eager float8 (dynamic activations) is 2.9x slower than bf16 on an H200 (Flux-dev's
    # transformer 508.2 against 173.8 ms); compiled (regionally) it is the fastest format there,
    # 113.7 ms (../shared/notes/speed-levers.md, lab/gpu_levers.py).
    compiled_only = ("float8",)
    quantizes = ("denoiser", "text_encoder")  # text encoders through transformers' configs
    # Measured on an H200: Flux-dev int8 streamed with group offload (docs/benchmarks.md).
    survives_group_offload = True
    # Reported to fail with CUDA streams (diffusers#13281, #14433, open), but SDXL int8 with
    # streams ran on an H200 with diffusers 0.42.1 and torch 2.11
    # (docs/runs/2026-12-01-h200-speed/sdxl-4GB-torchao-streams.json; Flux-dev not run).
    survives_group_offload_streams = True
    # The larger of SDXL's and Flux-dev's measurements (docs/benchmarks.md).
    layer_errors = {"int8": 9.0e-3, "float8": 3.7e-2}
    # bitsandbytes NF4 text encoders beside Flux-dev int8 on an H200
    # (docs/runs/2026-12-01-h200-sweep/flux/).
    encoder_backends = ("bitsandbytes",)
    # Fusing requantizes: int8's fused output is off the adapter's by 9-12 % of the LoRA's own
    # contribution (twice bf16's 5 %; builtin:tiny-sd on CPU), float8 is unmeasured. Kept an
    # adapter, which is exact.
    fuses_lora = False

    @classmethod
    def text_encoder_precision(cls, precision: str) -> str:
        return _TEXT_ENCODER_PRECISION

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        import transformers

        mapping: dict[str, Any] = {}
        for component in self._quantized(request):
            if component.library == "transformers":
                config = _ao_config(_TEXT_ENCODER_PRECISION)
                mapping[component.name] = transformers.TorchAoConfig(quant_type=config)
            else:
                mapping[component.name] = diffusers.TorchAoConfig(
                    _ao_config(request.tier.precision)
                )
        return mapping

    def describe(self, tier: Tier) -> str:
        kind = "float8 dynamic" if tier.precision == "float8" else "int8 weight-only"
        return f"{kind} in {', '.join(tier.quantized_components)}"
