"""Accelerators as torch sees them: the fallback when NVML cannot answer.

Importing torch costs about a second, so this runs only after NVML failed. Asking CUDA for free
memory creates a context on each device; that is the price of having no NVML.
"""

from __future__ import annotations

import logging
from typing import Any

from autoquant.probe.types import DetectedDevices, GpuInfo

_log = logging.getLogger(__name__)

MPS_DEVICE_NAME = "Apple GPU (MPS)"


def probe_torch_devices(
    torch_module: Any = None, *, ram_total_bytes: int, ram_available_bytes: int
) -> DetectedDevices:
    """CUDA (or ROCm) GPUs, else the MPS device, else XPU GPUs, else the CPU.

    ``torch_module`` is torch (imported when None); tests pass a fake. The host's RAM sizes the MPS
    device, which shares system memory.
    """
    try:
        torch = torch_module if torch_module is not None else _import_torch()
        return (
            _cuda_devices(torch)
            or _mps_device(torch, ram_total_bytes, ram_available_bytes)
            or _xpu_devices(torch)
            or DetectedDevices("cpu")
        )
    except Exception as exc:
        # A GPU that cannot even report its memory cannot run a plan either: plan for the CPU.
        _log.debug("torch could not list devices (%s); planning for the CPU", exc)
        return DetectedDevices("cpu")


def _import_torch() -> Any:
    import torch

    return torch


def _cuda_devices(torch: Any) -> DetectedDevices | None:
    if not torch.cuda.is_available():
        return None
    # ROCm builds of torch expose AMD GPUs through torch.cuda; torch.version.hip tells them apart.
    rocm = bool(getattr(torch.version, "hip", None))
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free_bytes, _ = torch.cuda.mem_get_info(index)
        gpus.append(
            GpuInfo(
                name=props.name,
                total_bytes=int(props.total_memory),
                free_bytes=int(free_bytes),
                # On ROCm major/minor are the gfx version, not a CUDA compute capability.
                compute_capability=None if rocm else f"{props.major}.{props.minor}",
                index=index,
            )
        )
    return DetectedDevices("rocm" if rocm else "cuda", tuple(gpus)) if gpus else None


def _mps_device(
    torch: Any, ram_total_bytes: int, ram_available_bytes: int
) -> DetectedDevices | None:
    mps_backend = getattr(torch.backends, "mps", None)
    if mps_backend is None or not mps_backend.is_available():
        return None
    # MPS allocates from system RAM, capped by Metal's recommended working-set size where torch
    # can tell it (torch.mps.recommended_max_memory, torch >= 2.5).
    recommended_max_memory = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
    total_bytes = int(recommended_max_memory()) if recommended_max_memory else ram_total_bytes
    gpu = GpuInfo(
        name=MPS_DEVICE_NAME,
        total_bytes=total_bytes,
        free_bytes=min(ram_available_bytes, total_bytes),
    )
    return DetectedDevices("mps", (gpu,))


def _xpu_devices(torch: Any) -> DetectedDevices | None:
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return None
    gpus = []
    for index in range(xpu.device_count()):
        props = xpu.get_device_properties(index)
        free_bytes, _ = xpu.mem_get_info(index)
        gpus.append(
            GpuInfo(
                name=props.name,
                total_bytes=int(props.total_memory),
                free_bytes=int(free_bytes),
                index=index,
            )
        )
    return DetectedDevices("xpu", tuple(gpus)) if gpus else None
