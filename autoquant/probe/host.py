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
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class HostFacts:
    cpu: CpuInfo
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int


def probe_host() -> HostFacts:
    model, flags = parse_cpuinfo(_read_cpuinfo())
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    limit = cgroup_memory_limit(CGROUP)
    if limit is not None:  # a container: its limit, not the host's free memory, is what we have
        total = min(total, limit.limit_bytes)
        available = min(available, max(limit.limit_bytes - limit.used_bytes, 0))
    return HostFacts(
        cpu=CpuInfo(
            model=model or platform.processor() or platform.machine() or "unknown CPU",
            cores=usable_cores(),
            flags=flags,
        ),
        ram_total_bytes=total,
        ram_available_bytes=available,
        disk_free_bytes=disk_free_bytes(paths.cache_dir()),
    )


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int
    used_bytes: int


def cgroup_memory_limit(root: Path) -> CgroupMemory | None:
    """This process's cgroup memory limit and use (cgroup v2's memory.max / memory.current, or
    v1's memory.limit_in_bytes / memory.usage_in_bytes under ``root``); None where no limit is
    set. Pinned host copies (group offload with streams) count against it, and a container is
    killed past it however much the host has free (PKU-YuanGroup/Helios#141)."""
    for limit_file, used_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            raw = (root / limit_file).read_text().strip()
            used = int((root / used_file).read_text().strip())
        except (OSError, ValueError):
            continue
        # v2 writes "max" for no limit; v1 writes a huge page-aligned number instead.
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None
        return CgroupMemory(int(raw), used)
    return None


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
