"""Which quantization backends are installed, and whether diffusers can use them on the hardware.

Installation is read from package metadata and module specs, never by importing: the backends
take seconds to import and the probe must stay fast. Usability follows what diffusers 0.42's
quantizers accept in their ``validate_environment``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from autoquant.probe.types import Accelerator, BackendStatus

MIN_DIFFUSERS = "0.42"


@dataclass(frozen=True)
class _Backend:
    module: str
    minimum: str  # the oldest release diffusers 0.42 accepts
    extra: str  # autoquant's pip extra that installs it

    @property
    def install_hint(self) -> str:
        return f"pip install 'autoquant-diffusers[{self.extra}]'"


# Keyed by distribution name, which is also the profile's backend key.
_BACKENDS: dict[str, _Backend] = {
    "bitsandbytes": _Backend("bitsandbytes", "0.43.3", "bnb"),
    "optimum-quanto": _Backend("optimum.quanto", "0.2.6", "quanto"),
    "torchao": _Backend("torchao", "0.15.0", "torchao"),
    "gguf": _Backend("gguf", "0.10.0", "gguf"),
}
_MODULES = {name: backend.module for name, backend in _BACKENDS.items()}
_MODULES |= {"diffusers": "diffusers", "torch": "torch"}


def installed_versions() -> dict[str, str | None]:
    """Version of each backend distribution, diffusers and torch; None where not installed."""
    return {name: _installed_version(name, module) for name, module in _MODULES.items()}


def assess_backends(
    accelerator: Accelerator, versions: Mapping[str, str | None]
) -> dict[str, BackendStatus]:
    """Status of each backend and of diffusers on ``accelerator``, given installed versions."""
    diffusers = _assess_diffusers(versions.get("diffusers"))
    statuses = {
        name: _assess_backend(name, backend, versions.get(name), accelerator, diffusers)
        for name, backend in _BACKENDS.items()
    }
    statuses["diffusers"] = diffusers
    return statuses


def _assess_diffusers(version: str | None) -> BackendStatus:
    if version is None:
        return BackendStatus(
            False, None, False, f"not installed: pip install 'diffusers>={MIN_DIFFUSERS}'"
        )
    if not _at_least(version, MIN_DIFFUSERS):
        return BackendStatus(
            True,
            version,
            False,
            f"autoquant needs diffusers >= {MIN_DIFFUSERS}: pip install -U diffusers",
        )
    return BackendStatus(True, version, True)


def _assess_backend(
    name: str,
    backend: _Backend,
    version: str | None,
    accelerator: Accelerator,
    diffusers: BackendStatus,
) -> BackendStatus:
    if version is None:
        return BackendStatus(False, None, False, f"not installed: {backend.install_hint}")
    if not _at_least(version, backend.minimum):
        return BackendStatus(
            True,
            version,
            False,
            f"diffusers needs {name} >= {backend.minimum}: pip install -U {name}",
        )
    if not diffusers.usable:
        return BackendStatus(True, version, False, f"diffusers is not usable ({diffusers.reason})")
    usable, reason = _ON_HARDWARE[name](accelerator)
    return BackendStatus(True, version, usable, reason)


def _bitsandbytes_on(accelerator: Accelerator) -> tuple[bool, str | None]:
    # diffusers' 4-bit quantizer accepts torch.cuda (ROCm builds included), XPU or MPS devices; its
    # 8-bit quantizer only torch.cuda or XPU. Neither accepts the CPU, though bitsandbytes itself
    # runs there.
    if accelerator in ("cuda", "rocm", "xpu"):
        return True, None
    if accelerator == "mps":
        return (
            True,
            "on MPS diffusers accepts bitsandbytes 4-bit only; 8-bit needs CUDA, ROCm or XPU",
        )
    return False, (
        "diffusers' bitsandbytes quantizer needs a CUDA, ROCm or XPU device (4-bit also MPS); "
        "on CPU use gguf, quanto or torchao"
    )


def _quanto_on(accelerator: Accelerator) -> tuple[bool, str | None]:
    return (
        True,
        "Quanto is deprecated in diffusers and will be removed in 1.0; it still works in 0.42",
    )


def _torchao_on(accelerator: Accelerator) -> tuple[bool, str | None]:
    return True, None


def _gguf_on(accelerator: Accelerator) -> tuple[bool, str | None]:
    return True, (
        "GGUF runs by dequantizing weights on every forward (slower than bf16) and loads "
        "pre-quantized files only"
    )


_ON_HARDWARE: dict[str, Callable[[Accelerator], tuple[bool, str | None]]] = {
    "bitsandbytes": _bitsandbytes_on,
    "optimum-quanto": _quanto_on,
    "torchao": _torchao_on,
    "gguf": _gguf_on,
}


def _installed_version(distribution: str, module: str) -> str | None:
    """The distribution's version if its metadata and its module are both present: metadata
    alone can outlive a broken uninstall."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if _module_present(module) else None


def _module_present(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it. ``find_spec`` of a dotted name
    would import the parent package, so a submodule is looked up in the parent's folders."""
    parent, _, child = module.rpartition(".")
    if not parent:
        return importlib.util.find_spec(module) is not None
    parent_spec = importlib.util.find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return False
    locations = list(parent_spec.submodule_search_locations)
    return importlib.machinery.PathFinder.find_spec(child, locations) is not None


def _at_least(version: str, minimum: str) -> bool:
    """Compare release numbers ("0.42.1" >= "0.42"); pre-release tags are ignored, so a dev build
    of the minimum release counts as that release."""
    return _release(version) >= _release(minimum)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    numbers = [int(part) for part in match.group(0).split(".")] if match else [0]
    while len(numbers) > 1 and numbers[-1] == 0:  # "0.42.0" equals "0.42"
        numbers.pop()
    return tuple(numbers)
