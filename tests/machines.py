"""Made-up machines for tests that fake hardware: every fact faked, CPU flags included, so no
test depends on the host's CPU, its RAM or whether it has a GPU."""

from __future__ import annotations

from types import SimpleNamespace

from autoquant.probe import HostFacts, probe
from autoquant.probe.types import CpuInfo, HardwareProfile

GiB = 1024**3
# The two kinds of CPU seen on this project's machines.
CPU_FLAGS = {
    "bf16": ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"),  # a Xeon with AMX
    "no-bf16": ("avx2", "fma"),  # an AVX2-only AMD EPYC
}
INSTALLED = {
    "bitsandbytes": "0.50.2",
    "optimum-quanto": "0.2.7",
    "torchao": "0.18.0",
    "gguf": "0.19.0",
    "diffusers": "0.42.1",
    "torch": "2.13.0",
}


def made_up_host(cpu: str = "no-bf16", ram_gib: float = 64) -> HostFacts:
    return HostFacts(
        cpu=CpuInfo(model=f"Made-up CPU ({cpu})", cores=8, flags=CPU_FLAGS[cpu]),
        ram_total_bytes=int(ram_gib * GiB),
        ram_available_bytes=int(ram_gib * GiB * 0.75),
        disk_free_bytes=500 * GiB,
    )


def _no_nvml() -> SimpleNamespace:
    """An NVML that cannot start, as on a machine without an NVIDIA driver."""

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    return SimpleNamespace(nvmlInit=fail)


def _torch_without_devices() -> SimpleNamespace:
    """The parts of torch the probe reads, with no CUDA, ROCm, MPS or XPU device."""
    return SimpleNamespace(
        version=SimpleNamespace(hip=None, cuda=None),
        cuda=SimpleNamespace(is_available=lambda: False),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)),
    )


def made_up_machine(
    *,
    cpu: str = "no-bf16",
    ram_gib: float = 64,
    device: str | None = None,
    vram: int | None = None,
    compute_capability: str | None = None,
    packages: dict[str, str | None] | None = None,
) -> HardwareProfile:
    """A CPU-only machine of the given kind, or (with ``device="cuda"`` and ``vram``) that
    machine with an emulated GPU: no real driver, torch device or package is consulted."""
    return probe(
        vram=vram,
        device=device,
        compute_capability=compute_capability,
        nvml=_no_nvml(),
        torch_module=_torch_without_devices(),
        environ={},
        host=made_up_host(cpu, ram_gib),
        packages=INSTALLED if packages is None else packages,
    )
