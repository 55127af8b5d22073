"""The machine facts a profile's decision tree may test (`when:`), and how each is read from a
HardwareProfile: the one list both the profile validator (rules.py) and the planner use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autoquant.core.units import GB
from autoquant.probe.types import GpuInfo, HardwareProfile


def _gpu(profile: HardwareProfile) -> GpuInfo | None:
    return profile.primary_gpu if profile.has_gpu else None


def _vram_gb(profile: HardwareProfile) -> float:
    gpu = _gpu(profile)
    return round(gpu.total_bytes / GB, 1) if gpu else 0.0


def _compute_capability(profile: HardwareProfile) -> float:
    gpu = _gpu(profile)
    cap = gpu.capability if gpu else None
    return float(f"{cap[0]}.{cap[1]}") if cap else 0.0


FACTS: dict[str, Callable[[HardwareProfile], Any]] = {
    "has_gpu": lambda profile: profile.has_gpu,
    "accelerator": lambda profile: profile.accelerator,
    "vram_gb": _vram_gb,
    "ram_gb": lambda profile: round(profile.ram_total_bytes / GB, 1),
    "compute_capability": _compute_capability,
    "bf16": lambda profile: profile.bf16,
    "fp8": lambda profile: bool((gpu := _gpu(profile)) and gpu.fp8),
}


def machine_facts(profile: HardwareProfile) -> dict[str, Any]:
    """Every fact's value on the machine ``profile`` describes."""
    return {name: read(profile) for name, read in FACTS.items()}
