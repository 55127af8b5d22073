"""The hardware profile: plain frozen data with derived properties, no I/O."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Accelerator = Literal["cuda", "rocm", "mps", "xpu", "cpu"]

# Compute capability (major, minor) → NVIDIA architecture name. Checked in order; first match wins.
_ARCHES: tuple[tuple[tuple[int, int], str], ...] = (
    ((10, 0), "Blackwell"),
    ((9, 0), "Hopper"),
    ((8, 9), "Ada"),
    ((8, 0), "Ampere"),
    ((7, 5), "Turing"),
    ((7, 0), "Volta"),
    ((6, 0), "Pascal"),
)


def arch_for_capability(capability: tuple[int, int] | None) -> str | None:
    """Architecture name for a CUDA compute capability (e.g. (9, 0) → "Hopper")."""
    if capability is None:
        return None
    for floor, name in _ARCHES:
        if capability >= floor:
            return name
    return "pre-Pascal"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str | None = None  # "9.0"; None for non-NVIDIA devices
    index: int = 0

    @property
    def capability(self) -> tuple[int, int] | None:
        if not self.compute_capability:
            return None
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)

    @property
    def arch(self) -> str | None:
        return arch_for_capability(self.capability)

    @property
    def bf16(self) -> bool:
        """Native bf16 math: Ampere (8.0) and newer. Non-NVIDIA devices report None capability
        and are treated as bf16-capable (MPS, XPU and ROCm CDNA/RDNA3 all support it)."""
        cap = self.capability
        return cap is None or cap >= (8, 0)

    @property
    def fp8(self) -> bool:
        """fp8 tensor cores: Ada (8.9) and newer."""
        cap = self.capability
        return cap is not None and cap >= (8, 9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "compute_capability": self.compute_capability,
            "arch": self.arch,
            "bf16": self.bf16,
            "fp8": self.fp8,
        }


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    flags: tuple[str, ...] = ()

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX): bf16 compute is then ~3× faster than
        fp32 on CPU (measured in shared notes); without it bf16 is emulated and slower."""
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(self.flags))  # "bf16": Arm

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "cores": self.cores,
            "flags": list(self.flags),
            "bf16": self.bf16,
        }


@dataclass(frozen=True)
class BackendStatus:
    installed: bool
    version: str | None
    usable: bool
    reason: str | None = None  # why not usable, or a caveat (deprecation) a user should know

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DetectedDevices:
    """What one device source (NVML, or torch as the fallback) found."""

    accelerator: Accelerator
    gpus: tuple[GpuInfo, ...] = ()
    driver: str | None = None


@dataclass(frozen=True)
class HardwareProfile:
    accelerator: Accelerator
    gpus: tuple[GpuInfo, ...]
    driver: str | None
    ram_total_bytes: int
    ram_available_bytes: int
    cpu: CpuInfo
    disk_free_bytes: int
    backends: dict[str, BackendStatus] = field(default_factory=dict)
    emulated: tuple[str, ...] = ()  # names of fields overridden by --vram / --device
    torch_version: str | None = None

    @property
    def has_gpu(self) -> bool:
        return self.accelerator != "cpu" and bool(self.gpus)

    @property
    def primary_gpu(self) -> GpuInfo | None:
        """The GPU plans target by default: the one with the most memory."""
        return max(self.gpus, key=lambda g: g.total_bytes) if self.gpus else None

    @property
    def bf16(self) -> bool:
        """Whether bf16 is the right compute dtype on the device plans target."""
        gpu = self.primary_gpu
        return gpu.bf16 if self.has_gpu and gpu is not None else self.cpu.bf16

    def backend_usable(self, name: str) -> bool:
        status = self.backends.get(name)
        return status is not None and status.usable

    def to_dict(self) -> dict[str, Any]:
        return {
            "accelerator": self.accelerator,
            "gpus": [g.to_dict() for g in self.gpus],
            "driver": self.driver,
            "ram_total_bytes": self.ram_total_bytes,
            "ram_available_bytes": self.ram_available_bytes,
            "cpu": self.cpu.to_dict(),
            "disk_free_bytes": self.disk_free_bytes,
            "backends": {k: v.to_dict() for k, v in self.backends.items()},
            "emulated": list(self.emulated),
            "torch_version": self.torch_version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        gpu_fields = {"index", "name", "total_bytes", "free_bytes", "compute_capability"}
        return cls(
            accelerator=data["accelerator"],
            gpus=tuple(
                GpuInfo(**{k: v for k, v in g.items() if k in gpu_fields}) for g in data["gpus"]
            ),
            driver=data.get("driver"),
            ram_total_bytes=data["ram_total_bytes"],
            ram_available_bytes=data["ram_available_bytes"],
            cpu=CpuInfo(
                model=data["cpu"]["model"],
                cores=data["cpu"]["cores"],
                flags=tuple(data["cpu"].get("flags", ())),
            ),
            disk_free_bytes=data["disk_free_bytes"],
            backends={k: BackendStatus(**v) for k, v in data.get("backends", {}).items()},
            emulated=tuple(data.get("emulated", ())),
            torch_version=data.get("torch_version"),
        )
