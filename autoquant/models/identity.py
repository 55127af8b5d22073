"""Short, stable fingerprints of a diffusers model folder and of one of its components.

Caches key their artefacts on these (a converted GGUF, tuning results). A fingerprint covers the
contents of every JSON file (model_index.json, configs, shard indexes) and the relative name, size
and modification time of every other file, weights included. Weight bytes are not read: hashing a
20 GB checkpoint would take minutes, and replacing a weight file changes its size or mtime.
Copying a folder without keeping mtimes (plain ``cp -r``) therefore gives it a new identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from autoquant.core.errors import AutoquantError, ModelNotFoundError

# 16 hex digits (64 bits): short enough for a file name, far from colliding among one user's models.
_DIGEST_CHARS = 16


def model_identity(folder: Path) -> str:
    """Fingerprint of a whole diffusers folder: model_index.json plus every component it lists."""
    model_index = folder / "model_index.json"
    if not model_index.is_file():
        raise ModelNotFoundError(f"{folder} is not a diffusers model folder: no model_index.json")
    index = json.loads(model_index.read_text(encoding="utf-8"))
    records: list[Any] = [["model_index.json", _content_digest(model_index)]]
    for name in sorted(index):
        if (folder / name).is_dir() and is_component_entry(index[name]):
            records.append([name, _component_records(folder / name)])
    return _digest(records)


def component_identity(folder: Path, subfolder: str) -> str:
    """Fingerprint of one component (``folder/subfolder``): its JSON files and weight files."""
    component_dir = folder / subfolder
    if not component_dir.is_dir():
        raise AutoquantError(f"{folder} has no {subfolder!r} component folder")
    return _digest([subfolder, _component_records(component_dir)])


def is_component_entry(value: Any) -> bool:
    # Components appear in model_index.json as ["library", "ClassName"]; optional ones left out are
    # [null, null], and keys such as "_class_name" hold plain strings.
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def _component_records(component_dir: Path) -> list[list[Any]]:
    records: list[list[Any]] = []
    for path in sorted(component_dir.rglob("*")):
        relative = path.relative_to(component_dir)
        # Hidden entries are atomic writers' temporary files and OS clutter, not the model.
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix == ".json":
            records.append([relative.as_posix(), _content_digest(path)])
        else:
            stat = path.stat()
            records.append([relative.as_posix(), stat.st_size, stat.st_mtime_ns])
    return records


def _content_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(records: list[Any]) -> str:
    # JSON of nested lists is an unambiguous encoding: no two record lists serialise alike.
    encoded = json.dumps(records, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:_DIGEST_CHARS]
