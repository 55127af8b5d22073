"""Quantization backends, one module each behind one interface; the registry maps names."""

from __future__ import annotations

from autoquant.backends.base import BuildRequest, QuantBackend
from autoquant.backends.bitsandbytes import BitsAndBytes
from autoquant.backends.gguf import Gguf
from autoquant.backends.none import NoQuantization
from autoquant.backends.quanto import Quanto
from autoquant.backends.torchao import TorchAo
from autoquant.core.errors import BackendUnavailableError

_REGISTRY: dict[str, type[QuantBackend]] = {
    "none": NoQuantization,
    "quanto": Quanto,
    "bitsandbytes": BitsAndBytes,
    "torchao": TorchAo,
    "gguf": Gguf,
}


def get_backend(name: str) -> QuantBackend:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise BackendUnavailableError(
            f"unknown backend {name!r}: choose one of {', '.join(_REGISTRY)}"
        ) from None


__all__ = ["BuildRequest", "QuantBackend", "get_backend"]
