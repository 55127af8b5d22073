"""Fidelity classes: how far a tier's numbers are from the model's own, in three classes read
from each backend's measured per-layer error (backends/*.py `layer_errors`, the bench's metric,
docs/benchmarks.md). The planner's objectives compare classes, not raw errors: a 2× difference
in error inside a class is noise next to the 10× between classes."""

from __future__ import annotations

from autoquant.backends import backend_class
from autoquant.backends.tier import Tier

# Best first, each with the largest per-layer error it holds. Classes are named after their
# typical member: bf16 (~2e-3, also fp16 and fp32), int8 (~1e-2, also GGUF q8_0), 4bit (~1e-1,
# also GGUF q5 and eager fp8, measured at 3.7-3.8e-2). Bounds: the geometric means between the
# typical errors (2e-3 and 1e-2; 1e-2 and 1e-1).
FIDELITY_CLASSES: tuple[tuple[str, float], ...] = (
    ("bf16", 4.5e-3),
    ("int8", 3.2e-2),
    ("4bit", float("inf")),
)


def fidelity_class(tier: Tier) -> str:
    """The class of ``tier``'s measured per-layer error: the worst of its parts', so a bf16
    denoiser beside 4-bit text encoders is 4bit class (the errors were measured on denoiser
    layers; a text encoder's are taken at its format's figure)."""
    error = max(backend_class(t.backend).layer_error(t.precision) for t in tier.parts)
    return next(name for name, bound in FIDELITY_CLASSES if error <= bound)


def fidelity_rank(name: str) -> int:
    """0 for the best class."""
    return [n for n, _ in FIDELITY_CLASSES].index(name)
