"""Where autoquant keeps its cache (built-in model folders, GGUF files, tuning results)."""

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
