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
    # bf16 measured on SDXL and Flux-dev (docs/benchmarks.md); fp16 at bf16's figure (it has
    # three more mantissa bits, so it is no worse in range); fp32 is the reference itself.
    layer_errors = {"bf16": 2.3e-3, "fp16": 2.3e-3, "fp32": 0.0}

    @classmethod
    def vae_dtype(cls, precision: str, compute_dtype: str) -> str:
        return precision

    @classmethod
    def load_dtype(cls, precision: str, compute_dtype: str) -> str:
        return precision

    def describe(self, tier: Tier) -> str:
        return f"every component at {tier.precision}"
