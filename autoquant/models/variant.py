"""Which weights variant to load: `save_pretrained(variant="fp16")` writes
`diffusion_pytorch_model.fp16.safetensors` (sharded: `…fp16-00001-of-00002.safetensors` with
`….safetensors.index.fp16.json`), and diffusers loads such files only when told the variant.

The user names one (`--variant`, diffusers-cli's flag); a pipeline whose weighted components
lack standard weights and all ship the same single variant is loaded with that one. Told a
variant, diffusers loads it where a component ships it and the standard weights elsewhere; the
same rule picks the files to fetch from the hub (`hub_weight_files`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from autoquant.core.errors import ModelNotFoundError
from autoquant.models.identity import is_component_entry

# Variant names end up in file names and in download patterns: letters, digits, underscores.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_]+")
_SHARD = re.compile(r"-\d+-of-\d+\.safetensors$")
# Besides weights, the files of a component folder that loading reads: configs, tokenizer
# vocabularies (merges.txt, spiece.model). Never pickles.
_COMPONENT_FILE_SUFFIXES = (".json", ".txt", ".model")


def check_variant_name(name: str) -> str:
    if not VARIANT_NAME.fullmatch(name):
        raise ModelNotFoundError(
            f"weights variant {name!r}: a variant name is letters, digits and underscores (fp16)"
        )
    return name


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


def _named(variant: str) -> str:
    return variant or "standard"


def resolve_variant(
    shipped: Mapping[str, set[str]], requested: str | None, where: str
) -> str | None:
    """The variant to load, from the variants ("" standard) each weighted component ships.
    ``requested`` must be shipped by some component, and the others must have standard weights;
    without one, components lacking standard weights must all ship the same single variant."""
    if requested is None:
        only_variants = set[str]().union(*(s for s in shipped.values() if "" not in s))
        if len(only_variants) > 1:
            raise ModelNotFoundError(
                f"{where} ships only weight variants, and several "
                f"({', '.join(sorted(only_variants))}): pass --variant to pick one"
            )
        return only_variants.pop() if only_variants else None
    check_variant_name(requested)
    if not any(requested in variants for variants in shipped.values()):
        there = sorted({_named(v) for variants in shipped.values() for v in variants})
        raise ModelNotFoundError(
            f"{where} has no {requested} weights variant; its weights: {', '.join(there) or 'none'}"
        )
    neither = sorted(c for c, s in shipped.items() if requested not in s and "" not in s)
    if neither:
        raise ModelNotFoundError(
            f"{where}: {', '.join(neither)} ships neither {requested} nor standard weights"
        )
    return requested


def _component_folders(folder: Path) -> dict[str, Path]:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return {
        name: folder / name
        for name, entry in index.items()
        if is_component_entry(entry) and (folder / name).is_dir()
    }


def _shipped(component: Path) -> set[str]:
    return {
        v for p in component.iterdir() if p.is_file() and (v := _variant_of(p.name)) is not None
    }


def weights_variant(folder: Path, requested: str | None = None) -> str | None:
    """The variant to load ``folder`` with: ``requested`` once checked against what the folder
    ships, or the one its components ship instead of standard weights (None: standard)."""
    shipped = {name: _shipped(path) for name, path in _component_folders(folder).items()}
    return resolve_variant({n: s for n, s in shipped.items() if s}, requested, str(folder))


def _whole_copies(component: Path) -> set[str]:
    """The variants of which ``component`` holds a complete copy of the weights: one file, or a
    shard index with every shard it names (a snapshot may hold part of a download)."""
    whole = set()
    for path in component.iterdir():
        variant = _variant_of(path.name)
        if variant is None or not path.is_file():
            continue
        if path.name.endswith(".json"):
            if _shards_present(path):
                whole.add(variant)
        elif not _SHARD.search(path.name):
            whole.add(variant)
    return whole


def _shards_present(index: Path) -> bool:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return all((index.parent / str(name)).is_file() for name in set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def missing_weights(folder: Path, requested: str | None) -> str | None:
    """What a downloaded pipeline folder lacks before it loads with ``requested`` (or its own
    variant), in words; None when nothing is missing. Every component folder must be there,
    and each model (a folder with config.json) must hold a whole copy of the weights to load."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    absent = [n for n, e in index.items() if is_component_entry(e) and not (folder / n).is_dir()]
    if absent:
        return f"no folder of {', '.join(absent)}"
    models = {
        name: _whole_copies(path)
        for name, path in _component_folders(folder).items()
        if (path / "config.json").is_file()
    }
    unweighted = [name for name, whole in models.items() if not whole]
    if unweighted:
        return f"no weights of {', '.join(unweighted)}"
    try:
        resolve_variant(models, requested, str(folder))
    except ModelNotFoundError:
        return f"no {requested} weights" if requested else "no weights of a single variant"
    return None


def hub_weight_files(
    repo_files: Iterable[str], components: Iterable[str], requested: str | None, repo_id: str
) -> list[str]:
    """The files of a hub repo to download for its pipeline ``components``: their configs and
    tokenizer files, and of each component's weights only the copy that loads with the
    variant (`resolve_variant`), so neither fp16 duplicates nor unused standard weights
    are fetched."""
    wanted = set(components)
    by_component: dict[str, list[str]] = {}
    for path in repo_files:
        parts = path.split("/")
        if len(parts) == 2 and parts[0] in wanted:
            by_component.setdefault(parts[0], []).append(parts[1])
    shipped = {
        name: {v for v in map(_variant_of, files) if v is not None}
        for name, files in by_component.items()
    }
    variant = resolve_variant(
        {n: s for n, s in shipped.items() if s}, requested, f"hub repo {repo_id!r}"
    )
    chosen: list[str] = ["model_index.json"]
    for name, files in sorted(by_component.items()):
        load = variant if variant in shipped[name] else ""
        for file in sorted(files):
            kind = _variant_of(file)
            if kind == load or (kind is None and file.endswith(_COMPONENT_FILE_SUFFIXES)):
                chosen.append(f"{name}/{file}")
    return chosen
