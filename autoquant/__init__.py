"""autoquant: hardware-aware quantization tuning for Hugging Face diffusers pipelines.

    import autoquant
    profile = autoquant.probe()
    plan = autoquant.plan(profile, "builtin:sdxl")
    pipe = autoquant.load("builtin:tiny-sd")

Heavy libraries (torch, diffusers) load only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from autoquant.execute.ladder import Result, execute
    from autoquant.execute.loader import load
    from autoquant.planner.plan import Plan, plan
    from autoquant.probe import probe
    from autoquant.probe.types import HardwareProfile

_LAZY = {
    "probe": ("autoquant.probe", "probe"),
    "HardwareProfile": ("autoquant.probe.types", "HardwareProfile"),
    "plan": ("autoquant.planner", "plan"),
    "Plan": ("autoquant.planner", "Plan"),
    "execute": ("autoquant.execute.ladder", "execute"),
    "Result": ("autoquant.execute.ladder", "Result"),
    "load": ("autoquant.execute.loader", "load"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'autoquant' has no attribute {name!r}")


__all__ = ["HardwareProfile", "Plan", "Result", "__version__", "execute", "load", "plan", "probe"]
