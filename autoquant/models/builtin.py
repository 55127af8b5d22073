"""The built-in models: architectures shipped as JSON in ``configs/``, one file per model.

Each file holds what a diffusers folder's ``model_index.json`` holds (``model_index``), the
config of every component by its pipeline attribute (``components``: model, scheduler and
tokenizer settings), the dtype the weights are saved in, and a one-line description. No weights
ship: they are generated from a seed when the model is materialized (see ``materialize.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from autoquant.core.errors import ModelNotFoundError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class BuiltinSpec:
    """One shipped architecture, as read from ``configs/<name>.json``."""

    name: str
    description: str
    save_dtype: str  # "float32" for tiny models, "bfloat16" for full-size ones
    model_index: dict[str, Any]
    components: dict[str, dict[str, Any]]  # pipeline attribute -> config
    # Resolution to run at when the architecture's own default does not suit it (tiny-flux: the
    # Flux pipeline's 1024 px default would make a "tiny" model slow).
    default_size: int | None

    @property
    def pipeline_class(self) -> str:
        return str(self.model_index["_class_name"])

    def digest(self) -> str:
        """A hash of everything that determines the architecture and the saved files."""
        canonical = json.dumps(
            [self.save_dtype, self.model_index, self.components], sort_keys=True
        ).encode()
        return hashlib.sha256(canonical).hexdigest()


def builtin_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


@cache
def load_builtin(name: str) -> BuiltinSpec:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"no built-in model {name!r}; built-ins: {', '.join(builtin_names())}"
        )
    raw = json.loads(path.read_text())
    return BuiltinSpec(
        name=name,
        description=raw["description"],
        save_dtype=raw["save_dtype"],
        model_index=raw["model_index"],
        components=raw["components"],
        default_size=raw.get("default_size"),
    )
