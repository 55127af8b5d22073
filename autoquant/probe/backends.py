"""Which quantization backends are installed, and whether diffusers can use them on the hardware.

Installation is read from package metadata and module specs, never by importing
(core/packages.py). What each backend needs — its distribution, minimum version, extra, and the
accelerators diffusers 0.42's quantizer accepts in its ``validate_environment`` — is declared by
the backend itself (autoquant/backends/).
"""

from __future__ import annotations

from collections.abc import Mapping

from autoquant.backends import QuantBackend, installable
from autoquant.core.packages import at_least, installed_version
from autoquant.probe.types import Accelerator, BackendStatus

MIN_DIFFUSERS = "0.42"


def installed_versions() -> dict[str, str | None]:
    """Version of each backend distribution, diffusers and torch; None where not installed."""
    modules = {b.distribution: b.module for b in installable() if b.distribution and b.module}
    modules |= {"diffusers": "diffusers", "torch": "torch"}
    return {name: installed_version(name, module) for name, module in modules.items()}


def assess_backends(
    accelerator: Accelerator, versions: Mapping[str, str | None]
) -> dict[str, BackendStatus]:
    """Status of each backend and of diffusers on ``accelerator``, given installed versions."""
    diffusers = _assess_diffusers(versions.get("diffusers"))
    statuses = {
        backend.distribution: _assess_backend(
            backend, versions.get(backend.distribution), accelerator, diffusers
        )
        for backend in installable()
        if backend.distribution
    }
    statuses["diffusers"] = diffusers
    return statuses


def _assess_diffusers(version: str | None) -> BackendStatus:
    if version is None:
        return BackendStatus(
            False, None, False, f"not installed: pip install 'diffusers>={MIN_DIFFUSERS}'"
        )
    if not at_least(version, MIN_DIFFUSERS):
        return BackendStatus(
            True,
            version,
            False,
            f"autoquant needs diffusers >= {MIN_DIFFUSERS}: pip install -U diffusers",
        )
    return BackendStatus(True, version, True)


def _assess_backend(
    backend: type[QuantBackend],
    version: str | None,
    accelerator: Accelerator,
    diffusers: BackendStatus,
) -> BackendStatus:
    name = backend.distribution
    if version is None:
        return BackendStatus(False, None, False, f"not installed: {backend.install_hint()}")
    if backend.minimum_version and not at_least(version, backend.minimum_version):
        return BackendStatus(
            True,
            version,
            False,
            f"diffusers needs {name} >= {backend.minimum_version}: pip install -U {name}",
        )
    if not diffusers.usable:
        return BackendStatus(True, version, False, f"diffusers is not usable ({diffusers.reason})")
    refused = backend.refusal(accelerator)
    if refused:
        return BackendStatus(True, version, False, refused)
    return BackendStatus(True, version, True, backend.probe_note(accelerator))
