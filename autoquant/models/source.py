"""From what the user typed to a model source.

A spec is ``builtin:NAME``, a local diffusers folder (one with ``model_index.json``), a
single-file ``.safetensors`` checkpoint (converted once into a cached folder: single_file.py), or
a hub id ``org/name`` (whose files hub.py finds or fetches).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from autoquant.core.errors import ModelNotFoundError
from autoquant.models.builtin import builtin_names, load_builtin
from autoquant.models.types import ModelSource

BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Specs ending like this are files someone meant to pass, never hub repos.
FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".gguf", ".json")
# Checkpoints saved with torch.save: unpickling one can run any code it carries.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def resolve(spec: str, config: str | None = None) -> ModelSource:
    """Read a model spec; raises ModelNotFoundError (one line) for anything unusable. A
    single-file checkpoint resolves to its converted folder (converting it on first use), with
    the architecture ``config`` names (a diffusers folder or ``builtin:NAME``; default: the
    built-in its tensors match)."""
    from autoquant.models import single_file

    single = single_file.is_single_file(spec)
    if config is not None and not single:
        raise ModelNotFoundError(
            f"--config {config} goes with a single-file checkpoint (-m FILE.safetensors), not "
            f"with {spec!r}"
        )
    if single:
        folder = single_file.converted_folder(Path(spec), config)
        return ModelSource(spec, "local", str(folder))
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        load_builtin(name)  # raises, listing the built-ins, for an unknown name
        return ModelSource(spec, "builtin", name)
    if not spec.strip():
        raise ModelNotFoundError(f"empty model spec: {_what_to_pass()}")
    path = Path(spec).expanduser()
    if path.exists():
        return ModelSource(spec, "local", str(_pipeline_folder(path)))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"no such folder: {path}")
    if HUB_ID.match(spec):
        return ModelSource(spec, "hub", spec)
    hint = f" (did you mean builtin:{spec}?)" if spec in builtin_names() else ""
    raise ModelNotFoundError(f"cannot read {spec!r} as a model{hint}: {_what_to_pass()}")


def _what_to_pass() -> str:
    names = ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
    return f"pass one of {names}, a local diffusers folder or a hub id org/name"


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith(("/", os.sep))
        or spec.count("/") > 1  # a hub id has exactly one
        or (os.sep != "/" and os.sep in spec)
        or spec.lower().endswith(FILE_SUFFIXES)
    )


def _pipeline_folder(path: Path) -> Path:
    if not path.is_dir() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelNotFoundError(
            f"{path} is a pickled checkpoint, and autoquant loads only safetensors (unpickling "
            "can run code the file carries): where you trust it, convert it once with diffusers' "
            "from_single_file(...).save_pretrained(FOLDER) and pass the folder"
        )
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a file: pass a diffusers folder (with model_index.json) or a single-file "
            ".safetensors checkpoint"
        )
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no model_index.json: it is not a diffusers pipeline folder"
        )
    return path.resolve()
