"""Compiling a denoiser (the one way the executor and the bench do it) and the compile caches
that outlive the process. What a first call costs is timed by the smoke test (smoke.py).

A denoiser is compiled regionally (each of its class's ``_repeated_blocks``: diffusers'
``compile_repeated_blocks``) or whole, in one of torch.compile's modes: as its format's figure in
profiles/latency.yaml was measured (``SCOPES``, ``MODES``).

The caches are torch's "mega-cache" (``torch.compiler.save_cache_artifacts``: the inductor and
AOT-autograd entries the process compiled), one file per tier under ``cache_dir()/compile/``,
in a folder per machine, library versions, model and generation shape (``cache_folder``).
The file names are the tiers' labels, so the planner can be told which tiers are warm without
knowing any key (``warm_labels``). A wrong claim costs only a figure: torch keys the artifacts
on the graphs themselves, so an artifact that does not match is never used.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path
from typing import Any

from autoquant.core.fsutil import atomic_file
from autoquant.core.paths import cache_dir
from autoquant.execute.tuning_entry import torch_and_diffusers_versions
from autoquant.models.types import ModelInventory
from autoquant.probe.types import HardwareProfile

COMPILE_DIR = "compile"
_ARTIFACT_SUFFIX = ".bin"


# How a denoiser may be compiled (profiles/latency.yaml compile: each figure names the scope and
# mode it was measured with, and the executor compiles that way). "regional": each block of the
# class's _repeated_blocks on its own with fullgraph=True (diffusers' compile_repeated_blocks;
# one block's code serves them all, so it compiles in seconds: Flux-dev on an H200, 17 s);
# "whole": the denoiser's forward as one graph (SDXL's UNet: its resnets and samplers are not
# repeated blocks, and only whole was measured 2x faster). Modes are torch.compile's.
SCOPES = ("regional", "whole")
MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def compile_denoiser(denoiser: Any, *, scope: str, mode: str) -> str:
    """Compile ``denoiser`` in place (the pipeline's attribute and its module names unchanged);
    returns how, in words ("regional (…blocks…)" or "whole", and the mode unless default). A
    denoiser without repeated blocks is compiled whole whatever ``scope`` asks."""
    import torch

    if scope not in SCOPES or mode not in MODES:
        raise ValueError(f"compile scope {scope!r} / mode {mode!r}: not one of {SCOPES} / {MODES}")
    options: dict[str, str] = {} if mode == "default" else {"mode": mode}
    blocks = tuple(getattr(denoiser, "_repeated_blocks", None) or ())
    suffix = "" if mode == "default" else f", {mode}"
    if scope == "regional" and blocks and hasattr(denoiser, "compile_repeated_blocks"):
        denoiser.compile_repeated_blocks(fullgraph=True, **options)
        return f"regional ({', '.join(blocks)}){suffix}"
    # The forward, not the module's __call__ (nn.Module.compile): forward hooks (the smoke
    # test's timers) then stay outside the compiled code, and adding or removing one does not
    # recompile it.
    denoiser.forward = torch.compile(denoiser.forward, mode=options.get("mode"))
    return f"whole{suffix}"


def cache_folder(
    profile: HardwareProfile, inventory: ModelInventory, *, width: int, height: int, batch: int
) -> Path:
    """Where the compile caches of one machine, library versions, model and generation shape
    live. Keyed as a tuning entry is (execute/tuning_entry.py), with the model's denoiser (its
    class and parameter count) in place of the folder's fingerprint: the planner asks before any
    folder is built (`autoquant plan` builds none), and compiled code depends on the model's
    architecture and the shapes, not its weights' bytes."""
    gpu = profile.primary_gpu if profile.has_gpu else None
    fields = {
        "accelerator": profile.accelerator,
        "gpu": gpu.name if gpu else None,
        "compute_capability": gpu.compute_capability if gpu else None,
        "cpu": None if gpu else profile.cpu.model,
        "versions": {
            **torch_and_diffusers_versions(),
            **{name: status.version for name, status in sorted(profile.backends.items())},
        },
        "model": inventory.source.spec,
        "denoiser": [inventory.denoiser.class_name, inventory.denoiser.params],
        "width": width,
        "height": height,
        "batch": batch,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return cache_dir() / COMPILE_DIR / hashlib.sha256(canonical.encode()).hexdigest()[:16]


def artifact_path(folder: Path, label: str) -> Path:
    """The cache file of the tier labelled ``label`` (its label, percent-encoded)."""
    return folder / (urllib.parse.quote(label, safe="") + _ARTIFACT_SUFFIX)


def warm_labels(folder: Path) -> frozenset[str]:
    """The labels of the tiers with a compile cache in ``folder``."""
    if not folder.is_dir():
        return frozenset()
    return frozenset(
        urllib.parse.unquote(path.name.removesuffix(_ARTIFACT_SUFFIX))
        for path in folder.iterdir()
        if path.name.endswith(_ARTIFACT_SUFFIX) and not path.name.startswith(".")
    )


def load_artifacts(path: Path) -> bool:
    """Load a saved compile cache into this process's torch caches; whether there was one."""
    import torch

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return torch.compiler.load_cache_artifacts(data) is not None


def save_artifacts(path: Path) -> bool:
    """Write what this process compiled to ``path`` atomically (a crash leaves no half file);
    whether there was anything to write."""
    import torch

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    data, _info = artifacts
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return True
