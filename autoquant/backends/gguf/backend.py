"""GGUF: the denoiser converted to a GGUF file (cached, convert.py), loaded with
`from_single_file` and passed into the pipeline as a component; or the user's own GGUF file of
the denoiser (`--gguf`, user_file.py), K-quants included, loaded the same way. Dequantizes per
forward (pure torch on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, WeightFormat, torch_dtype
from autoquant.backends.gguf.formats import (
    BLOCK_BYTES,
    GGUF_BLOCK,
    GGUF_TYPES,
    K_BLOCK,
    K_BLOCK_BYTES,
)
from autoquant.backends.tier import Tier


class Gguf(QuantBackend):
    name = "gguf"
    precisions = GGUF_TYPES
    # diffusers 0.42.1's GGUF loader memory-maps the file and copies every tensor out of it
    # (load_gguf_checkpoint), the file's pages resident beside the copies: builtin:sd15 with its
    # q8_0 UNet (a 2.64 GB file, as estimate.file_bytes gives it: 589 M of its 860 M parameters
    # are not in Linear layers of whole blocks, by its inventory, and stay F32 as convert.py
    # writes what it does not quantize) peaked at 5.73-5.87 GB of resident set, at
    # bf16 and fp32 compute alike, where its weights take 3.6 GB (docs/runs/cpu-choice*/).
    formats = {
        qtype: WeightFormat(
            size / GGUF_BLOCK, block=GGUF_BLOCK, file_copies_at_load=2, file_kept_bytes=4
        )
        for qtype, size in BLOCK_BYTES.items()
    }
    distribution = "gguf"
    module = "gguf"
    minimum_version = "0.10.0"
    extra = "gguf"
    # GGUF with sequential offload fails with KeyError None in diffusers 0.42.1; with group
    # offload it was never measured here, so it stays off until a GPU run shows it works.
    survives_group_offload = False
    # Text encoders beside a GGUF denoiser: torchao int8, built and run on the CPU in
    # tests/test_executor.py; bitsandbytes NF4 beside SDXL q8_0 on an H200
    # (docs/runs/2026-12-01-h200-sweep/sdxl-mixed/).
    encoder_backends = ("torchao", "bitsandbytes")
    # q8_0, q5_1 and q4_0 measured (docs/benchmarks.md, the larger of SDXL's and Flux-dev's);
    # q5_0 at q5_1's figure and q4_1 at q4_0's, the nearest measured.
    layer_errors = {"q8_0": 6.1e-3, "q5_1": 3.8e-2, "q5_0": 3.8e-2, "q4_1": 8.5e-2, "q4_0": 8.5e-2}
    # The K-quants of users' files (--gguf). autoquant cannot write them (gguf-py quantizes none),
    # so they are no precisions of the plan space, the bench or `convert`: only a tier forced
    # from a file is at one. Bytes are exact (gguf-py's GGML_QUANT_SIZES per 256 weights).
    # Read by the same loader; what a user's file keeps unquantized is taken as F32, the most.
    file_formats = {
        qtype: WeightFormat(size / K_BLOCK, block=K_BLOCK, file_copies_at_load=2, file_kept_bytes=4)
        for qtype, size in K_BLOCK_BYTES.items()
    }
    # q6_k, q5_k and q4_k measured by the bench's metric on N(0, 0.02) 512x1024 weights in bf16
    # (median of 12 layers), quantized by tests/test_gguf_file.py's encoder, a plain min-max one,
    # so an upper bound of what llama.cpp's searched scales give; the same measure reproduces the
    # benchmarks' q8_0 6.1e-3, q5_1 3.8e-2 and q4_0 8.6e-2. q3_k and q2_k, not measured, at
    # q4_k's figure, the nearest measured: theirs are larger, and in the last class either way.
    file_layer_errors = {
        "q6_k": 2.0e-2,
        "q5_k": 3.8e-2,
        "q4_k": 7.8e-2,
        "q3_k": 7.8e-2,
        "q2_k": 7.8e-2,
    }
    writes_files = True  # `autoquant convert` writes its files
    # fuse_lora fails on GGUF weights in diffusers 0.42.1 ("The size of tensor a (36) must match
    # the size of tensor b (64)": it adds the delta to the packed blocks). It runs as an adapter.
    fuses_lora = False
    note_on = dict.fromkeys(
        ("cuda", "rocm", "xpu", "mps", "cpu"),
        "GGUF runs by dequantizing weights on every forward (slower than bf16) and loads "
        "pre-quantized files only",
    )

    @classmethod
    def convert(
        cls, folder: Path, precision: str, *, out: Path | None = None, progress: bool = True
    ) -> Any:
        """Write (or find in the cache) the GGUF file of ``folder``'s denoiser."""
        from autoquant.backends.gguf.convert import convert_denoiser

        return convert_denoiser(folder, precision, out=out, progress=progress)

    @classmethod
    def format(cls, precision: str) -> WeightFormat | None:
        return cls.formats.get(precision) or cls.file_formats.get(precision)

    @classmethod
    def layer_error(cls, precision: str) -> float:
        if precision in cls.file_layer_errors:
            return cls.file_layer_errors[precision]
        return cls.layer_errors[precision]

    def prepare(self, request: BuildRequest) -> Any:
        """The user's file when the tier's weights come from one (read again: it is the one the
        plan named, and must still be there), else the converted file."""
        if request.gguf_file is not None:
            from autoquant.backends.gguf.user_file import read_gguf_file

            return read_gguf_file(request.gguf_file)
        return self.convert(request.folder, request.tier.precision, progress=request.progress)

    def components(self, request: BuildRequest) -> dict[str, Any]:
        import diffusers
        from diffusers import GGUFQuantizationConfig

        denoiser = request.inventory.denoiser
        converted = self.prepare(request)  # a cache hit once prepared
        model_class = getattr(diffusers, denoiser.class_name)
        compute = torch_dtype(request.tier.compute_dtype)
        model = model_class.from_single_file(
            str(converted.path),
            config=str(request.folder),
            subfolder=denoiser.name,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute),
            torch_dtype=compute,
        )
        return {denoiser.name: model}

    def describe(self, tier: Tier) -> str:
        return f"{tier.precision} GGUF denoiser (nn.Linear weights; other tensors F16/F32)"
