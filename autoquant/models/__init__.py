"""Models: resolving what the user names, counting parameters, and producing loadable folders.

Importing this package is cheap: torch, diffusers and transformers are imported only inside the
functions that need them.
"""

from __future__ import annotations

from typing import Any

from autoquant.models.builtin import builtin_names, load_builtin
from autoquant.models.inventory import inventory
from autoquant.models.materialize import materialize
from autoquant.models.source import BUILTIN_PREFIX, resolve

__all__ = ["builtin_names", "inventory", "list_builtins", "materialize", "resolve"]


def list_builtins() -> list[dict[str, Any]]:
    """One entry per built-in, for `autoquant models`: what it is and its parameter counts."""
    listing = []
    for name in builtin_names():
        spec = load_builtin(name)
        inv = inventory(resolve(BUILTIN_PREFIX + name))
        listing.append(
            {
                "name": name,
                "description": spec.description,
                "pipeline_class": inv.pipeline_class,
                "family": inv.family,
                "default_size": inv.default_size,
                "params": inv.params,
                "components": [c.to_dict() for c in inv.components],
            }
        )
    return listing
