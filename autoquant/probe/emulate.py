"""Planning for another machine: override the detected device and memory (--device, --vram), or
put a named card in its place (--gpu, from probe/gpu_table.py).

A pure function on a HardwareProfile. Every overridden field is named in ``profile.emulated`` so
reports can mark it, and backend usability is recomputed when the accelerator changes.
"""

from __future__ import annotations

import re
from dataclasses import replace

from autoquant.core.errors import AutoquantError
from autoquant.probe.backends import assess_backends
from autoquant.probe.types import GpuInfo, HardwareProfile

DEVICES = ("cuda", "cpu", "mps")
EMULATED_CUDA_NAME = "Emulated CUDA GPU"
EMULATED_MPS_NAME = "Emulated Apple GPU (MPS)"
# Ampere (RTX 30xx, A100) is the oldest generation with bf16 and still the most common one.
DEFAULT_COMPUTE_CAPABILITY = "8.6"
CAPABILITY = re.compile(r"^\d+\.\d+$")  # also the GPU table's format


def emulate(
    profile: HardwareProfile,
    *,
    vram: int | None = None,
    device: str | None = None,
    compute_capability: str | None = None,
    name: str | None = None,
) -> HardwareProfile:
    """``profile`` as it would be with ``device``'s accelerator, ``vram`` bytes on every GPU and,
    for CUDA, ``compute_capability``. Unchanged when all of them are None. ``device="cuda"`` keeps
    a ROCm GPU: torch addresses it as "cuda" too. With ``name``, the machine's GPUs give way to
    one CUDA GPU of that name, ``vram`` and ``compute_capability``: a card from the GPU table."""
    _check_arguments(vram, device, compute_capability)
    marks: tuple[str, ...]
    if name is not None:
        if device not in (None, "cuda"):
            raise AutoquantError(
                f"{name} is a CUDA GPU: it cannot be emulated as --device {device}"
            )
        emulated, marks = _emulated_cuda(profile, vram, compute_capability, name)
    elif device == "cpu":
        if vram is not None or compute_capability is not None:
            raise AutoquantError("--device cpu takes neither --vram nor --compute-capability")
        emulated = replace(profile, accelerator="cpu", gpus=(), driver=None)
        marks = ("accelerator", "gpus")
    elif device == "cuda" and profile.accelerator not in ("cuda", "rocm"):
        emulated, marks = _emulated_cuda(profile, vram, compute_capability, None)
    elif device == "mps" and profile.accelerator != "mps":
        emulated, marks = _emulated_mps(profile, vram, compute_capability)
    else:  # the detected device stays; only its numbers may change
        emulated, marks = _overridden_gpus(profile, vram, compute_capability)
    if emulated.accelerator != profile.accelerator:
        versions = {
            name: status.version if status.installed else None
            for name, status in profile.backends.items()
        }
        emulated = replace(emulated, backends=assess_backends(emulated.accelerator, versions))
    return replace(emulated, emulated=profile.emulated + marks)


def _check_arguments(vram: int | None, device: str | None, compute_capability: str | None) -> None:
    if device is not None and device not in DEVICES:
        raise AutoquantError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if vram is not None and vram <= 0:
        raise AutoquantError(f"--vram must be greater than zero, not {vram}")
    if compute_capability is not None and not CAPABILITY.match(compute_capability):
        raise AutoquantError(
            f"compute capability {compute_capability!r} must be MAJOR.MINOR, e.g. 8.6 or 12.0"
        )


def _emulated_cuda(
    profile: HardwareProfile, vram: int | None, compute_capability: str | None, name: str | None
) -> tuple[HardwareProfile, tuple[str, ...]]:
    if vram is None:
        if name is not None:
            raise AutoquantError(f"an emulated {name} needs its memory size (vram)")
        raise AutoquantError("--device cuda on a machine without a CUDA GPU needs --vram SIZE")
    gpu = GpuInfo(
        name=name or EMULATED_CUDA_NAME,
        total_bytes=vram,
        free_bytes=vram,
        compute_capability=compute_capability or DEFAULT_COMPUTE_CAPABILITY,
    )
    # A named card may replace a real CUDA GPU, whose accelerator then stays what it was.
    marks = (
        *(("accelerator",) if profile.accelerator != "cuda" else ()),
        *(("gpus[0].name",) if name is not None else ()),
        "gpus[0].total_bytes",
        "gpus[0].free_bytes",
        "gpus[0].compute_capability",
    )
    return replace(profile, accelerator="cuda", gpus=(gpu,), driver=None), marks


def _emulated_mps(
    profile: HardwareProfile, vram: int | None, compute_capability: str | None
) -> tuple[HardwareProfile, tuple[str, ...]]:
    if compute_capability is not None:
        raise AutoquantError("--compute-capability applies to CUDA GPUs, not to --device mps")
    # Like a real MPS device, an emulated one shares this host's RAM unless --vram sizes it.
    gpu = GpuInfo(
        name=EMULATED_MPS_NAME,
        total_bytes=vram if vram is not None else profile.ram_total_bytes,
        free_bytes=vram if vram is not None else profile.ram_available_bytes,
    )
    marks = ("accelerator", "gpus[0].total_bytes", "gpus[0].free_bytes")
    return replace(profile, accelerator="mps", gpus=(gpu,), driver=None), marks


def _overridden_gpus(
    profile: HardwareProfile, vram: int | None, compute_capability: str | None
) -> tuple[HardwareProfile, tuple[str, ...]]:
    if vram is not None and not profile.gpus:
        raise AutoquantError(
            "--vram needs a GPU: add --device cuda (or mps) to plan for a machine with one"
        )
    if compute_capability is not None and profile.accelerator != "cuda":
        raise AutoquantError(
            f"--compute-capability applies to CUDA GPUs; this machine's accelerator is "
            f"{profile.accelerator}"
        )
    gpus = list(profile.gpus)
    marks: list[str] = []
    for position, gpu in enumerate(gpus):
        if vram is not None:
            # A smaller budget on this card cannot free what other processes hold on it now.
            gpu = replace(gpu, total_bytes=vram, free_bytes=min(gpu.free_bytes, vram))
            marks += [f"gpus[{position}].total_bytes", f"gpus[{position}].free_bytes"]
        if compute_capability is not None:
            gpu = replace(gpu, compute_capability=compute_capability)
            marks.append(f"gpus[{position}].compute_capability")
        gpus[position] = gpu
    return replace(profile, gpus=tuple(gpus)), tuple(marks)
