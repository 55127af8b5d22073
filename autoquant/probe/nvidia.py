"""NVIDIA GPUs through NVML: names, memory, compute capability and driver, without starting CUDA.

NVML answers in milliseconds and creates no CUDA context, so it is asked first; when it cannot
answer, the caller falls back to torch (see torch_devices.py).

NVML numbers GPUs by PCI bus id. CUDA's default order is fastest first, which agrees on machines
whose GPUs are all one model; mixed machines need CUDA_DEVICE_ORDER=PCI_BUS_ID for the two to match.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Mapping
from typing import Any

from autoquant.probe.types import DetectedDevices, GpuInfo

_log = logging.getLogger(__name__)


def probe_nvidia(
    nvml: Any = None, environ: Mapping[str, str] | None = None
) -> DetectedDevices | None:
    """The NVIDIA GPUs this process may use, in CUDA's order, or None when NVML cannot tell (not
    installed, no driver, a call failing, no visible GPU, or a CUDA_VISIBLE_DEVICES it cannot
    read): torch is then asked instead.

    ``nvml`` is the pynvml module (imported when None); tests pass a fake.
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            _log.debug("pynvml is not installed; asking torch")
            return None
    visible_setting = (environ or {}).get("CUDA_VISIBLE_DEVICES")
    # Any failure is caught, not only nvml.NVMLError: a broken driver or library must make the
    # probe fall back, never crash autoquant.
    try:
        nvml.nvmlInit()
    except Exception as exc:
        _log.debug("NVML unavailable (%s); asking torch", exc)
        return None
    try:
        return _read_devices(nvml, visible_setting)
    except Exception as exc:
        _log.debug("NVML failed while reading devices (%s); asking torch", exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def visible_nvml_indices(setting: str | None, count: int) -> list[int] | None:
    """NVML indices of the GPUs CUDA_VISIBLE_DEVICES exposes, in CUDA ordinal order.

    None when the setting is not a list of integers (GPU-/MIG- UUIDs): torch, which reads it
    through the CUDA runtime, is then the reliable source. Like CUDA, the list ends at the first
    invalid entry (negative, out of range or repeated).
    """
    if setting is None:
        return list(range(count))
    indices: list[int] = []
    for entry in (part.strip() for part in setting.split(",")):
        if not entry:
            break
        try:
            index = int(entry)
        except ValueError:
            return None
        if not 0 <= index < count or index in indices:
            break
        indices.append(index)
    return indices


def _read_devices(nvml: Any, visible_setting: str | None) -> DetectedDevices | None:
    indices = visible_nvml_indices(visible_setting, nvml.nvmlDeviceGetCount())
    if not indices:
        # Unreadable setting or nothing visible: torch may still find a GPU (or another kind of
        # accelerator) where NVML cannot.
        return None
    gpus = tuple(_read_gpu(nvml, nvml_index, ordinal) for ordinal, nvml_index in enumerate(indices))
    return DetectedDevices("cuda", gpus, _text(nvml.nvmlSystemGetDriverVersion()))


def _read_gpu(nvml: Any, nvml_index: int, ordinal: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
    # Device-wide numbers: "free" already excludes memory other processes hold.
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        compute_capability=f"{major}.{minor}",
        index=ordinal,
    )


def _text(value: str | bytes) -> str:
    """Older nvidia-ml-py releases return bytes where newer ones return str."""
    return value.decode() if isinstance(value, bytes) else value
