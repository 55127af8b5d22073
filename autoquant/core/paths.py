"""Where autoquant keeps its cache (built-in model folders, GGUF files, tuning results) and where
its shipped profiles live."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$AUTOQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoquant``, else
    ``~/.cache/autoquant``. Created on first use by whoever writes into it."""
    explicit = os.environ.get("AUTOQUANT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "autoquant"


def profiles_dir() -> Path:
    """The shipped profiles folder (default.yaml, presets/, gpus.yaml)."""
    # A wheel ships profiles/ as autoquant/profiles; a source checkout has it beside autoquant/.
    package = Path(__file__).resolve().parents[1]
    installed = package / "profiles"
    return installed if installed.is_dir() else package.parent / "profiles"
