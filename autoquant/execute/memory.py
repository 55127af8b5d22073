"""Measuring and freeing device memory; recognising out-of-memory errors."""

from __future__ import annotations

import contextlib
import gc
import resource
import sys
from pathlib import Path
from typing import Any

_CPU_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory")


def is_oom(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA/XPU/MPS), the CPU allocator's failure, or any MemoryError
    (numpy's "Unable to allocate …", or a bare one: seen under RLIMIT_AS in tests/test_serve.py)."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _CPU_OOM_MARKERS)


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def free(device: str, *, keep_compiled: bool = False) -> None:
    """Collect garbage and give cached blocks back, so a failed tier's memory is reusable.
    Call it after leaving the `except` block: a live traceback pins the failed tensors. Unless
    ``keep_compiled`` (the same tier runs on: a failed call of it, a split batch), torch.compile's
    graphs go too: a failed tier's hold references, and a kept tier would compile each shape
    again."""
    import torch

    gc.collect()
    if _on_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if keep_compiled:
        return
    with contextlib.suppress(Exception):  # dynamo may be unavailable: nothing to reset then
        torch._dynamo.reset()  # compiled graphs hold references too


def allocated(device: str) -> int:
    """Bytes held by tensors: the allocator's count on CUDA, the resident set on CPU."""
    import torch

    if _on_cuda(device) and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


# Linux keeps the resident high-water mark as VmHWM in /proc/self/status, and writing "5" to
# /proc/self/clear_refs resets it to the current resident set (proc(5)). Without that, a CPU
# peak covers the whole process so far: a smoke test measured after a cold materialization read
# 394 MiB above the weights for one 64² tiny-sd image, against 31 MiB with the reset.
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak(device: str) -> None:
    import torch

    if _on_cuda(device) and torch.cuda.is_available():
        # Resetting the stats before anything initialised CUDA fails ("Invalid device argument").
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux, or not allowed: peak() then covers the process so far.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak(device: str) -> int:
    """Peak bytes since the last reset: the allocator's on CUDA; on CPU the resident
    high-water mark (since the last reset on Linux, else over the whole process so far)."""
    import torch

    if _on_cuda(device) and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def cap_process_memory(device: str, limit_bytes: int) -> dict[str, Any]:
    """Cap this process's CUDA allocations at ``limit_bytes`` (a real OOM past it), the way a
    smaller card would. Returns what was set, for the report."""
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, limit_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"device": device, "limit_bytes": limit_bytes, "fraction": fraction}


def allocator_limit(card_bytes: int, total_bytes: int, free_bytes: int, reserved_bytes: int) -> int:
    """What PyTorch's allocator may hold for this process to behave like a card of
    ``card_bytes``: the card minus what already sits outside the allocator on this one (the CUDA
    context, cuBLAS workspaces, other processes: total − free − what the allocator reserved)."""
    outside = max(0, total_bytes - free_bytes - reserved_bytes)
    return max(0, card_bytes - outside)


def emulate_card(device: str, card_bytes: int) -> dict[str, Any]:
    """Make this process see a card of ``card_bytes``, context included (`--vram-limit`): the
    allocator is capped at what such a card leaves after the memory outside the allocator,
    measured now that the CUDA context exists. A per-process cap alone would be generous by
    that much (about 0.65 GiB on an H200, planner/estimate.py CUDA_CONTEXT_BYTES)."""
    import torch

    index = torch.device(device).index or 0
    torch.cuda.init()
    torch.zeros(1, device=f"cuda:{index}")  # the context and the allocator exist from here
    free, total = torch.cuda.mem_get_info(index)
    limit = allocator_limit(card_bytes, total, free, torch.cuda.memory_reserved(index))
    return {**cap_process_memory(device, limit), "card_bytes": card_bytes}
