"""The GGUF types autoquant writes and loads, shared by the backend, the converter and the reader
of users' own files (user_file.py)."""

from __future__ import annotations

# Every type here quantizes a row in blocks of this many values, so only nn.Linear weights whose
# in_features is a multiple of it are quantized.
GGUF_BLOCK = 32
# Bytes per block of GGUF_BLOCK weights, by type, in the order a user reads them.
BLOCK_BYTES = {"q8_0": 34, "q5_1": 24, "q5_0": 22, "q4_1": 20, "q4_0": 18}
GGUF_TYPES = tuple(BLOCK_BYTES)

# K-quants quantize rows in super-blocks of this many values (ggml's QK_K).
K_BLOCK = 256
# Bytes per super-block of K_BLOCK weights (gguf-py's GGML_QUANT_SIZES). gguf-py cannot write
# these, so autoquant never converts to them: they come only from a file the user gives (--gguf).
K_BLOCK_BYTES = {"q6_k": 210, "q5_k": 176, "q4_k": 144, "q3_k": 110, "q2_k": 84}
FILE_ONLY_TYPES = tuple(K_BLOCK_BYTES)
