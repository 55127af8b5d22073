"""No quantization: the pipeline at bf16/fp16/fp32."""

from __future__ import annotations

from autoquant.backends.base import QuantBackend
from autoquant.backends.tier import Tier


class NoQuantization(QuantBackend):
    name = "none"

    def describe(self, tier: Tier) -> str:
        return f"every component at {tier.precision}"
