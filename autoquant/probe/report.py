"""A human summary of a HardwareProfile: one line per device, then RAM, disk and backends."""

from __future__ import annotations

from autoquant.core.units import format_bytes
from autoquant.probe.types import BackendStatus, GpuInfo, HardwareProfile


def describe(profile: HardwareProfile) -> str:
    emulated = profile.emulated
    lines = [_accelerator_line(profile, emulated)]
    if profile.gpus:
        lines += [_gpu_line(gpu, position, emulated) for position, gpu in enumerate(profile.gpus)]
    else:
        lines.append("GPU: none" + (" (emulated)" if "gpus" in emulated else ""))
    cpu = profile.cpu
    lines.append(f"CPU: {cpu.model} — {cpu.cores} cores, bf16 units {_yes(cpu.bf16)}")
    lines.append(
        f"RAM: {format_bytes(profile.ram_total_bytes)} total, "
        f"{format_bytes(profile.ram_available_bytes)} available"
    )
    lines.append(f"Disk: {format_bytes(profile.disk_free_bytes)} free for the cache")
    header = "Backends (for the emulated hardware):" if "accelerator" in emulated else "Backends:"
    lines.append(header)
    lines += [f"  {_backend_line(name, status)}" for name, status in profile.backends.items()]
    return "\n".join(lines)


def _accelerator_line(profile: HardwareProfile, emulated: tuple[str, ...]) -> str:
    line = f"Accelerator: {profile.accelerator}"
    if "accelerator" in emulated:
        line += " (emulated)"
    if profile.driver:
        line += f", driver {profile.driver}"
    if profile.torch_version:
        line += f", torch {profile.torch_version}"
    return line


def _gpu_line(gpu: GpuInfo, position: int, emulated: tuple[str, ...]) -> str:
    parts = [
        f"{format_bytes(gpu.total_bytes)} total",
        f"{format_bytes(gpu.free_bytes)} free",
    ]
    if gpu.compute_capability:
        parts.append(f"compute {gpu.compute_capability} ({gpu.arch})")
    parts += [f"bf16 {_yes(gpu.bf16)}", f"fp8 {_yes(gpu.fp8)}"]
    line = f"GPU {gpu.index}: {gpu.name} — {', '.join(parts)}"
    prefix = f"gpus[{position}]."
    overridden = [name.removeprefix(prefix) for name in emulated if name.startswith(prefix)]
    if overridden:
        words = ", ".join(name.removesuffix("_bytes").replace("_", " ") for name in overridden)
        line += f" (emulated: {words})"
    return line


def _backend_line(name: str, status: BackendStatus) -> str:
    label = f"{name} {status.version}" if status.version else name
    verdict = "usable" if status.usable else "not usable"
    return f"{label}: {verdict}" + (f" — {status.reason}" if status.reason else "")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
