"""optimum-quanto: int8/int4/float8 weights, quantized on the fly; runs on CPU and GPU."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, WeightFormat
from autoquant.backends.tier import Tier

# Tier precision → quanto weight dtype. "mixed" is int8 weights with the VAE kept in fp32.
_WEIGHTS = {"int8": "int8", "int4": "int4", "float8": "float8", "mixed": "int8"}
# Text encoders get transformers' own QuantoConfig at int8, whatever the denoiser's precision.
_TEXT_ENCODER_WEIGHTS = "int8"
# transformers' quanto quantizer skips _keep_in_fp32_modules (T5's "wo"), as bitsandbytes does.
_EIGHT_BIT = WeightFormat(1.0, skips_kept_modules=True)


class Quanto(QuantBackend):
    name = "quanto"
    precisions = ("int8", "int4", "float8", "mixed")
    formats = {
        "int8": _EIGHT_BIT,
        "mixed": _EIGHT_BIT,
        "float8": _EIGHT_BIT,
        # 4 bits + bf16 scale and shift per group of 128; it first materializes the bf16
        # weights, so loading peaks at about 0.58× the bf16 model (measured 12.35 GiB for
        # Flux-dev on an H200).
        "int4": WeightFormat(0.5 + 4 / 128, load_peak_factor=0.58, skips_kept_modules=True),
    }
    distribution = "optimum-quanto"
    module = "optimum.quanto"
    minimum_version = "0.2.6"
    extra = "quanto"
    quantizes = ("denoiser", "text_encoder")  # text encoders through transformers' configs
    # Group offload leaves its weights on the CPU: "mat2 is on cpu" on a GPU in diffusers 0.42.1
    # (CHANGELOG.md, where quanto stopped being paired with it).
    survives_group_offload = False
    # int8 and int4 measured (docs/benchmarks.md; int8 the larger of SDXL's and Flux-dev's);
    # "mixed" is int8 weights; float8 at torchao float8's figure, the nearest measured.
    layer_errors = {"int8": 9.3e-3, "mixed": 9.3e-3, "int4": 9.9e-2, "float8": 3.7e-2}
    # diffusers 0.42.1 fuses nothing into quanto's weights, silently: the fused image equals the
    # image without the LoRA (builtin:tiny-sd, every precision). It runs as an adapter instead.
    fuses_lora = False
    caveat = "Quanto is deprecated in diffusers and will be removed in 1.0; it still works in 0.42"

    @classmethod
    def text_encoder_precision(cls, precision: str) -> str:
        return _TEXT_ENCODER_WEIGHTS

    @classmethod
    def vae_dtype(cls, precision: str, compute_dtype: str) -> str:
        return "fp32" if precision == "mixed" else compute_dtype  # "mixed": decode quality

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        import transformers

        weights = _WEIGHTS[request.tier.precision]
        mapping: dict[str, Any] = {}
        for component in self._quantized(request):
            if component.library == "transformers":
                mapping[component.name] = transformers.QuantoConfig(weights=_TEXT_ENCODER_WEIGHTS)
            else:
                mapping[component.name] = diffusers.QuantoConfig(weights_dtype=weights)
        return mapping

    def post_process(self, pipe: Any, request: BuildRequest) -> None:
        tier = request.tier
        if self.vae_dtype(tier.precision, tier.compute_dtype) == tier.compute_dtype:
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
        vae = self.vae_dtype(tier.precision, tier.compute_dtype)
        return text + (f"; VAE in {vae}" if vae != tier.compute_dtype else "")
