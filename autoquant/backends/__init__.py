"""Quantization backends, one module (or subpackage) each behind one interface (base.py).

This registry is the one place that lists them: adding a backend means writing its module and
adding one line here. Everything else asks the registry and reads the backend's declarations.
"""

from __future__ import annotations

from autoquant.backends.base import BuildRequest, QuantBackend
from autoquant.backends.bitsandbytes import BitsAndBytes
from autoquant.backends.gguf import Gguf
from autoquant.backends.none import NoQuantization
from autoquant.backends.quanto import Quanto
from autoquant.backends.torchao import TorchAo
from autoquant.core.errors import BackendUnavailableError

# In the order the probe lists them; "none" first.
_REGISTRY: dict[str, type[QuantBackend]] = {
    backend.name: backend for backend in (NoQuantization, BitsAndBytes, Quanto, TorchAo, Gguf)
}
UNQUANTIZED = NoQuantization.name  # the tier of plain bf16/fp16/fp32 weights


def backend_class(name: str) -> type[QuantBackend]:
    """The class of the backend called ``name``, whose declarations the caller reads."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendUnavailableError(
            f"unknown backend {name!r}: choose one of {', '.join(_REGISTRY)}"
        ) from None


def get_backend(name: str) -> QuantBackend:
    return backend_class(name)()


def backend_classes() -> tuple[type[QuantBackend], ...]:
    return tuple(_REGISTRY.values())


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def installable() -> tuple[type[QuantBackend], ...]:
    """The backends that are a package of their own (what the probe looks for)."""
    return tuple(b for b in _REGISTRY.values() if b.distribution)


def converter_for(precision: str) -> type[QuantBackend]:
    """The backend that writes files of format ``precision`` (`autoquant convert --to`)."""
    writers = [b for b in _REGISTRY.values() if b.writes_files]
    for backend in writers:
        if precision in backend.precisions:
            return backend
    known = ", ".join(p for b in writers for p in b.precisions)
    raise BackendUnavailableError(f"--to {precision!r}: choose one of {known}")


def validate_tier_name(backend: str, precision: str | None) -> None:
    """Raise ValueError with a one-line message for an unknown backend or precision."""
    if backend not in _REGISTRY:
        names = ", ".join(_REGISTRY)
        raise ValueError(f"unknown backend {backend!r}: choose one of {names}")
    precisions = _REGISTRY[backend].precisions
    if precision is not None and precision not in precisions:
        raise ValueError(
            f"unknown precision {precision!r} for backend {backend!r}: "
            f"choose one of {', '.join(precisions)}"
        )


__all__ = [
    "UNQUANTIZED",
    "BuildRequest",
    "QuantBackend",
    "backend_class",
    "backend_classes",
    "backend_names",
    "converter_for",
    "get_backend",
    "installable",
    "validate_tier_name",
]
