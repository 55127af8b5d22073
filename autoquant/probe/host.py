"""Host facts: CPU model, usable cores and flags, RAM, and disk room for the cache."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from autoquant.core import paths
from autoquant.probe.types import CpuInfo

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class HostFacts:
    cpu: CpuInfo
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int


def probe_host() -> HostFacts:
    model, flags = parse_cpuinfo(_read_cpuinfo())
    memory = psutil.virtual_memory()
    return HostFacts(
        cpu=CpuInfo(
            model=model or platform.processor() or platform.machine() or "unknown CPU",
            cores=usable_cores(),
            flags=flags,
        ),
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        disk_free_bytes=disk_free_bytes(paths.cache_dir()),
    )


def parse_cpuinfo(text: str) -> tuple[str | None, tuple[str, ...]]:
    """The first processor's model name and flags from /proc/cpuinfo text.

    x86 lists "model name" and "flags"; ARM lists "Features" and often no model name.
    """
    model: str | None = None
    flags: tuple[str, ...] = ()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "Features") and not flags:
            flags = tuple(value.split())
    return model, flags


def usable_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask), not all the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def disk_free_bytes(path: Path) -> int:
    """Free space where ``path`` is or will be: its nearest existing ancestor's file system."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # not Linux
        return ""
