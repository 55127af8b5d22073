"""bitsandbytes NF4/FP4/int8, quantized while loading onto the GPU (diffusers refuses CPU)."""

from __future__ import annotations

from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, WeightFormat, torch_dtype
from autoquant.backends.tier import Tier

# NF4/FP4: 4 bits + one fp32 absmax per 64 weights (diffusers' default has no double
# quantization); int8: 1 byte + per-row fp32 scales (negligible per weight), and quantized copies
# of the activations. transformers' bitsandbytes quantizer skips _keep_in_fp32_modules (T5's "wo":
# Flux-dev with T5 quantized on an H200, int8 weights 18.2 GB against torchao's 17.2).
_FOUR_BIT = WeightFormat(0.5 + 4 / 64, skips_kept_modules=True, quantizes_on_device=True)


class BitsAndBytes(QuantBackend):
    name = "bitsandbytes"
    precisions = ("nf4", "fp4", "int8")
    formats = {
        "nf4": _FOUR_BIT,
        "fp4": _FOUR_BIT,
        "int8": WeightFormat(
            1.0, activation_factor=1.45, skips_kept_modules=True, quantizes_on_device=True
        ),
    }
    distribution = "bitsandbytes"
    module = "bitsandbytes"
    minimum_version = "0.43.3"
    extra = "bnb"
    loggers = ("bitsandbytes",)
    # diffusers' 4-bit quantizer accepts torch.cuda (ROCm builds included), XPU or MPS devices;
    # its 8-bit quantizer only torch.cuda or XPU. Neither accepts the CPU, though bitsandbytes
    # itself runs there.
    runs_on = {"cuda": None, "rocm": None, "xpu": None, "mps": ("nf4", "fp4")}
    refused_on_device = (
        "diffusers' bitsandbytes quantizer needs a CUDA, ROCm or XPU device (4-bit also MPS); "
        "on CPU use gguf, quanto or torchao"
    )
    note_on = {
        "mps": "on MPS diffusers accepts bitsandbytes 4-bit only; 8-bit needs CUDA, ROCm or XPU"
    }
    quantizes = ("denoiser", "text_encoder")  # text encoders through transformers' configs
    # Flux-dev NF4 with group offload failed in its first generation with
    # "CUBLAS_STATUS_INTERNAL_ERROR when calling cublasCreate" on an H200 (docs/benchmarks.md).
    survives_group_offload = False
    # nf4 and int8 measured (docs/benchmarks.md, the larger of SDXL's and Flux-dev's); fp4 at
    # nf4's figure, the nearest measured (NF4 is the better-spread 4-bit code of the two).
    layer_errors = {"nf4": 9.2e-2, "fp4": 9.2e-2, "int8": 1.2e-2}
    # torchao int8 text encoders beside SDXL NF4 on an H200
    # (docs/runs/2026-12-01-h200-sweep/sdxl-mixed/).
    encoder_backends = ("torchao",)
    # NF4 SDXL at 4 GB and NF4 Flux-dev at 10 GB, the text encoders at bf16 on the host's CPU,
    # on a lent H100 (docs/runs/2026-12-08-h100-cpu-te/).
    beside_cpu_text_encoders = True
    # Fusing dequantizes and requantizes (peft warns of rounding errors); unmeasured, since
    # diffusers refuses it on the CPU. Kept an adapter.
    fuses_lora = False

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        import transformers

        tier = request.tier
        if tier.precision == "int8":
            kwargs: dict[str, Any] = {"load_in_8bit": True}
        else:
            kwargs = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": tier.precision,
                "bnb_4bit_compute_dtype": torch_dtype(tier.compute_dtype),
            }
        mapping: dict[str, Any] = {}
        for component in self._quantized(request):
            library = transformers if component.library == "transformers" else diffusers
            mapping[component.name] = library.BitsAndBytesConfig(**kwargs)
        return mapping

    def describe(self, tier: Tier) -> str:
        return f"{tier.precision} weights in {', '.join(tier.quantized_components)}"
