"""Which weights variant a pipeline folder ships: `save_pretrained(variant="fp16")` writes
`diffusion_pytorch_model.fp16.safetensors` (sharded: `…fp16-00001-of-00002.safetensors` with
`….safetensors.index.fp16.json`), and diffusers loads such files only when told the variant.
A folder (or hub snapshot) that ships nothing else is loaded with its variant."""

from __future__ import annotations

import json
from pathlib import Path

from autoquant.core.errors import ModelNotFoundError
from autoquant.models.identity import is_component_entry


def _variant_of(name: str) -> str | None:
    """The variant a weights file name carries ("" for standard weights); None for a file that
    is not weights."""
    if name.endswith(".json"):  # a shard index: X.safetensors.index[.VARIANT].json
        head, sep, rest = name.partition(".safetensors.index")
        if not sep or not head:
            return None
        return rest.removesuffix(".json").removeprefix(".")
    if not name.endswith(".safetensors") or name.startswith("."):
        return None
    parts = name.removesuffix(".safetensors").split(".")
    if len(parts) == 1:
        return ""  # model.safetensors, model-00001-of-00002.safetensors
    return parts[-1].split("-")[0]  # model.fp16.safetensors, model.fp16-00001-of-00002…


def weights_variant(folder: Path) -> str | None:
    """The variant every weighted component of ``folder`` ships when none ships standard weights;
    None when standard weights are there. Components shipping different variants only are a
    one-line error: autoquant cannot tell which to load."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    variants: set[str] = set()
    for name, entry in index.items():
        component = folder / name
        if not (is_component_entry(entry) and component.is_dir()):
            continue
        found = {_variant_of(p.name) for p in component.iterdir() if p.is_file()} - {None}
        if "" in found:
            return None
        variants.update(v for v in found if v)
    if len(variants) > 1:
        raise ModelNotFoundError(
            f"{folder} ships only weight variants, and several ({', '.join(sorted(variants))}): "
            "keep one of them, or standard weights"
        )
    return variants.pop() if variants else None
