"""No quantization: the pipeline at bf16/fp16/fp32."""

from __future__ import annotations

from autoquant.backends.base import QuantBackend
from autoquant.backends.tier import COMPUTE_DTYPES, Tier


class NoQuantization(QuantBackend):
    name = "none"
    precisions = COMPUTE_DTYPES
    quantizes = ()
    survives_group_offload = True
    survives_group_offload_streams = True
    # Text encoders beside a bf16/fp32 pipeline: torchao int8, built and run on the CPU in
    # tests/test_executor.py and beside Flux-dev bf16 on an H200; bitsandbytes NF4 beside SDXL
    # bf16 on an H200 (docs/runs/2026-12-01-h200-sweep/flux/, sdxl-mixed/).
    encoder_backends = ("torchao", "bitsandbytes")
    # bf16 measured on SDXL and Flux-dev (docs/benchmarks.md); fp16 at bf16's figure (it has
    # three more mantissa bits, so it is no worse in range); fp32 is the reference itself.
    layer_errors = {"bf16": 2.3e-3, "fp16": 2.3e-3, "fp32": 0.0}
    # Fused, a layer's output differs from the active adapter's by 4e-6 of the LoRA's own
    # contribution at fp32 and 5 % at bf16 (builtin:tiny-sd on CPU; tests/test_lora.py checks
    # the fused image against the adapter's).
    fuses_lora = True

    @classmethod
    def vae_dtype(cls, precision: str, compute_dtype: str) -> str:
        return precision

    @classmethod
    def load_dtype(cls, precision: str, compute_dtype: str) -> str:
        return precision

    def describe(self, tier: Tier) -> str:
        but = " but the text encoders" if tier.encoders else ""
        return f"every component{but} at {tier.precision}"
