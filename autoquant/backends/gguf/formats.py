"""The GGUF types autoquant writes and loads, shared by the backend and the converter."""

from __future__ import annotations

# Every type here quantizes a row in blocks of this many values, so only nn.Linear weights whose
# in_features is a multiple of it are quantized.
GGUF_BLOCK = 32
# Bytes per block of GGUF_BLOCK weights, by type, in the order a user reads them.
BLOCK_BYTES = {"q8_0": 34, "q5_1": 24, "q5_0": 22, "q4_1": 20, "q4_0": 18}
GGUF_TYPES = tuple(BLOCK_BYTES)
