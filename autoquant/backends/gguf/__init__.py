"""GGUF: the backend (backend.py) and the converter that writes its files (convert.py)."""

from autoquant.backends.gguf.backend import Gguf

__all__ = ["Gguf"]
