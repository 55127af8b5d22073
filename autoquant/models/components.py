"""Which entries of a pipeline's model_index.json are counted components, and their roles."""

from __future__ import annotations

from typing import Any

from autoquant.models.types import Role


def component_role(name: str) -> Role | None:
    """The role of a pipeline attribute, or None for parts that are not counted (tokenizers,
    schedulers, safety checkers, image encoders and processors)."""
    if name in ("unet", "transformer"):
        return "denoiser"
    if name == "vae":
        return "vae"
    if name.startswith("text_encoder"):
        return "text_encoder"
    return None


def counted_components(model_index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Counted component name -> (library, class name), skipping entries set to None."""
    counted = {}
    for name, entry in model_index.items():
        if component_role(name) is None or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        counted[name] = (str(library), str(class_name))
    return counted
