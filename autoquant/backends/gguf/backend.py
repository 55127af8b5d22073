"""GGUF: the denoiser converted to a GGUF file (cached, convert.py), loaded with
`from_single_file` and passed into the pipeline as a component. Dequantizes per forward (pure
torch on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoquant.backends.base import BuildRequest, QuantBackend, WeightFormat, torch_dtype
from autoquant.backends.gguf.formats import BLOCK_BYTES, GGUF_BLOCK, GGUF_TYPES
from autoquant.backends.tier import Tier


class Gguf(QuantBackend):
    name = "gguf"
    precisions = GGUF_TYPES
    formats = {
        qtype: WeightFormat(size / GGUF_BLOCK, block=GGUF_BLOCK)
        for qtype, size in BLOCK_BYTES.items()
    }
    distribution = "gguf"
    module = "gguf"
    minimum_version = "0.10.0"
    extra = "gguf"
    # GGUF with sequential offload fails with KeyError None in diffusers 0.42.1; with group
    # offload it was never measured here, so it stays off until a GPU run shows it works.
    survives_group_offload = False
    # q8_0, q5_1 and q4_0 measured (docs/benchmarks.md, the larger of SDXL's and Flux-dev's);
    # q5_0 at q5_1's figure and q4_1 at q4_0's, the nearest measured.
    layer_errors = {"q8_0": 6.1e-3, "q5_1": 3.8e-2, "q5_0": 3.8e-2, "q4_1": 8.5e-2, "q4_0": 8.5e-2}
    writes_files = True  # `autoquant convert` writes its files
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

    def prepare(self, request: BuildRequest) -> Any:
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
