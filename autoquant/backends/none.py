"""No quantization: the pipeline at bf16/fp16/fp32."""

from __future__ import annotations

from autoquant.backends.base import QuantBackend
from autoquant.backends.tier import COMPUTE_DTYPES, Tier


class NoQuantization(QuantBackend):
    name = "none"
    precisions = COMPUTE_DTYPES
    quantizes = ()
    survives_group_offload = True

    @classmethod
    def vae_dtype(cls, precision: str, compute_dtype: str) -> str:
        return precision

    @classmethod
    def load_dtype(cls, precision: str, compute_dtype: str) -> str:
        return precision

    def describe(self, tier: Tier) -> str:
        return f"every component at {tier.precision}"
