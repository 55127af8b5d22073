"""How far a tier's numbers are from the reference's.

- Per-layer error: for each nn.Linear of the denoiser, ‖y − y_ref‖/‖y_ref‖ on x ~ N(0, 1), with
  y_ref computed in fp32 (no TF32) on the tier's device from the weights in the model folder's
  safetensors (streamed one tensor at a time, never a second model). The clean measure: it does
  not compound through the network (gpu-anchors.md: bf16 2.3e-3, int8 ~9e-3, 4-bit ~9e-2).
- Relative error of a tensor (the denoiser's output on the reference's saved inputs): amplified
  ~10× through a random-weight network, so use it to rank, not as an absolute.
- PSNR and SSIM (Wang et al. 2004: 11-tap Gaussian window, σ 1.5, K1 0.01, K2 0.03, L 255,
  'valid' filtering, mean over the map and the RGB channels) of the decoded image.
- Quality score: 100 × (1 − mean|a − b| / 255) over every pixel and channel, the seed's
  pixel-difference score (100 = identical; two unrelated uniform-noise images score ~67).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.core.errors import error_line

if TYPE_CHECKING:
    import torch

PIXEL_MAX = 255.0
_SSIM_TAPS = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
# Rows of x per layer: enough that the error estimate is stable to a few percent.
LAYER_ROWS = 64


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in float64 on the CPU."""
    import torch

    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    denominator = float(torch.linalg.vector_norm(e))
    if denominator == 0:
        raise ValueError("the expected tensor is all zeros: a relative error is undefined")
    return float(torch.linalg.vector_norm(a - e)) / denominator


def psnr(image: np.ndarray, reference: np.ndarray) -> float | None:
    """Peak signal-to-noise ratio in dB of two uint8 images; None when they are identical
    (infinite PSNR, which JSON cannot hold)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(PIXEL_MAX**2 / mse)


def quality_score(image: np.ndarray, reference: np.ndarray) -> float:
    """100 × (1 − mean|a − b| / 255)."""
    diff = np.abs(image.astype(np.float64) - reference.astype(np.float64))
    return 100.0 * (1.0 - float(diff.mean()) / PIXEL_MAX)


def _gaussian_taps() -> np.ndarray:
    offsets = np.arange(_SSIM_TAPS) - (_SSIM_TAPS - 1) / 2
    taps = np.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    return taps / taps.sum()


def _filter_valid(plane: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering, keeping only positions where the window fits ('valid')."""
    from numpy.lib.stride_tricks import sliding_window_view

    rows = sliding_window_view(plane, len(taps), axis=0) @ taps
    return sliding_window_view(rows, len(taps), axis=1) @ taps


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM of two uint8 images (H×W or H×W×C), averaged over channels."""
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {image.shape} vs {reference.shape}")
    if min(image.shape[:2]) < _SSIM_TAPS:
        raise ValueError(f"SSIM needs images of at least {_SSIM_TAPS} px a side")
    a3 = image.reshape(*image.shape[:2], -1).astype(np.float64)
    b3 = reference.reshape(*reference.shape[:2], -1).astype(np.float64)
    taps = _gaussian_taps()
    c1 = (_SSIM_K1 * PIXEL_MAX) ** 2
    c2 = (_SSIM_K2 * PIXEL_MAX) ** 2
    scores = []
    for channel in range(a3.shape[2]):
        a, b = a3[..., channel], b3[..., channel]
        mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
        var_a = _filter_valid(a * a, taps) - mu_a**2
        var_b = _filter_valid(b * b, taps) - mu_b**2
        cov = _filter_valid(a * b, taps) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        )
        scores.append(float(ssim_map.mean()))
    return float(np.mean(scores))


def image_fidelity(image: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    return {
        "psnr_db": psnr(image, reference),
        "ssim": ssim(image, reference),
        "quality_score": quality_score(image, reference),
    }


@dataclass
class LayerErrors:
    """Per-layer relative errors of one denoiser's nn.Linear modules."""

    errors: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # layer → why it could not be compared

    def summary(self) -> dict[str, Any]:
        values = list(self.errors.values())
        return {
            "per_layer_error_median": float(np.median(values)) if values else None,
            "per_layer_error_max": max(values) if values else None,
            "layers_compared": len(values),
            "layers_failed": len(self.failed),
            "first_failure": next(iter(self.failed.items()), None),
        }


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """fp32 matmuls in full fp32 on CUDA (TF32 rounds to 10 mantissa bits: 1e-3 of error
    would land in the reference itself)."""
    import torch

    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def _module_device(module: torch.nn.Module, fallback: str) -> torch.device:
    import torch

    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return tensor.device
    return torch.device(fallback)


def _run_on(module: torch.nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    """The module's output on ``device``. An offloaded layer (weights parked on the CPU) is
    moved there for the call and back, so it runs the same kernels as a resident one."""
    import torch

    home = _module_device(module, device)
    target = torch.device(device)
    moved = home.type != target.type
    if moved:
        module.to(target)
    try:
        return module(x)
    finally:
        if moved:
            module.to(home)


def linear_layer_errors(
    denoiser: torch.nn.Module,
    weights_dir: Path,
    *,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
) -> LayerErrors:
    """Compare each nn.Linear of ``denoiser`` (quantized replacements are nn.Linear subclasses,
    matched by module name) with fp32 math on the weights stored in ``weights_dir``."""
    import torch
    from safetensors import safe_open

    result = LayerErrors()
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles: dict[str, Any] = {}
        for path in sorted(weights_dir.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            handles.update(dict.fromkeys(handle.keys(), handle))
        for name, module in denoiser.named_modules():
            key = f"{name}.weight"
            if not isinstance(module, torch.nn.Linear) or key not in handles:
                continue
            # The same x for a layer in every tier's process: seeded by the layer's name.
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            x = torch.randn(LAYER_ROWS, module.in_features, generator=generator).to(device)
            weight = handles[key].get_tensor(key).to(device).float()
            bias_key = f"{name}.bias"
            bias = (
                handles[bias_key].get_tensor(bias_key).to(device).float()
                if bias_key in handles
                else None
            )
            with _ieee_fp32():
                expected = torch.nn.functional.linear(x, weight, bias)
            try:
                actual = _run_on(module, x.to(device, dtype), device)
            except Exception as err:
                result.failed[name] = error_line(err)
                continue
            result.errors[name] = relative_error(actual, expected)
    return result
