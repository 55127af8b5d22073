"""The hardware probe: what this machine, or an emulated one, offers autoquant.

``probe()`` asks NVML first, torch only when NVML cannot answer, reads host facts and which
quantization backends are installed (without importing them), then applies any emulation (or a
named card of the GPU table, profiles/gpus.yaml). It keeps no state: every source can be passed
in, which is how the tests fake hardware.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from autoquant.core.errors import AutoquantError
from autoquant.probe.backends import assess_backends, installed_versions
from autoquant.probe.emulate import emulate
from autoquant.probe.gpu_table import GpuSpec, GpuTable, find_gpu, load_gpu_table, spec_for
from autoquant.probe.host import HostFacts, probe_host
from autoquant.probe.nvidia import probe_nvidia
from autoquant.probe.report import describe
from autoquant.probe.torch_devices import probe_torch_devices
from autoquant.probe.types import HardwareProfile

__all__ = [
    "GpuSpec",
    "HostFacts",
    "describe",
    "emulate",
    "find_gpu",
    "load_gpu_table",
    "probe",
    "spec_for",
]


def probe(
    *,
    vram: int | None = None,
    device: str | None = None,
    compute_capability: str | None = None,
    gpu: str | None = None,
    gpu_table: GpuTable | None = None,
    nvml: Any = None,
    torch_module: Any = None,
    environ: Mapping[str, str] | None = None,
    host: HostFacts | None = None,
    packages: Mapping[str, str | None] | None = None,
) -> HardwareProfile:
    """Detect the hardware, then override it with ``vram`` (bytes), ``device`` ("cuda", "cpu" or
    "mps") and ``compute_capability`` ("8.6") to plan for another machine; or with ``gpu``, a card
    of ``gpu_table`` (default: the shipped one) by name or alias, its memory and capability.

    The remaining arguments replace real sources, for tests: ``nvml`` the pynvml module,
    ``torch_module`` torch, ``environ`` os.environ, ``host`` the host facts and ``packages`` the
    installed versions by distribution name (None for not installed).
    """
    spec = None
    if gpu is not None:
        if vram is not None or device is not None or compute_capability is not None:
            raise AutoquantError(
                f"GPU {gpu!r} comes with its memory and compute capability: give no vram, device "
                "or compute capability with it"
            )
        spec = find_gpu(gpu, gpu_table)  # before detection: a typo costs no NVML or torch start
    host = host if host is not None else probe_host()
    packages = packages if packages is not None else installed_versions()
    devices = probe_nvidia(nvml, environ if environ is not None else os.environ)
    if devices is None:
        devices = probe_torch_devices(
            torch_module,
            ram_total_bytes=host.ram_total_bytes,
            ram_available_bytes=host.ram_available_bytes,
        )
    detected = HardwareProfile(
        accelerator=devices.accelerator,
        gpus=devices.gpus,
        driver=devices.driver,
        ram_total_bytes=host.ram_total_bytes,
        ram_available_bytes=host.ram_available_bytes,
        cpu=host.cpu,
        disk_free_bytes=host.disk_free_bytes,
        backends=assess_backends(devices.accelerator, packages),
        torch_version=packages.get("torch"),
    )
    if spec is not None:
        return emulate(
            detected,
            vram=spec.memory_bytes,
            device="cuda",
            compute_capability=spec.compute_capability,
            name=spec.name,
        )
    return emulate(detected, vram=vram, device=device, compute_capability=compute_capability)
