"""Turn a model source into a folder that ``DiffusionPipeline.from_pretrained`` loads.

A built-in becomes a normal diffusers folder in the cache, with seeded random weights: each model
component is instantiated on the meta device, allocated with ``to_empty`` and filled in place, so
even a 12 B-param transformer is built at the speed of the random-number generator, one component
at a time (each is saved and freed before the next).
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.core.fsutil import atomic_dir
from autoquant.core.paths import cache_dir
from autoquant.models.builtin import BuiltinSpec, load_builtin
from autoquant.models.hub import download_from_hub
from autoquant.models.inventory import build_on_meta, import_component_class
from autoquant.models.tokenizers import build_tokenizer
from autoquant.models.types import ModelSource

if TYPE_CHECKING:
    import torch
    from torch import nn

# Bump when the way weights are generated changes: built-in folder names change with it, so a
# cached folder never holds weights from an older rule.
WEIGHTS_SCHEME = 1
COLLECT_AFTER_PARAMS = 100_000_000


def materialize(
    source: ModelSource,
    *,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    variant: str | None = None,
) -> Path:
    """The folder to pass to ``from_pretrained``: a local folder as is, a hub snapshot (with the
    weights ``variant``), or a built-in built once into the cache (random weights drawn on
    ``device``; a given device and seed always gives the same weights)."""
    if source.kind == "local":
        return Path(source.name)
    if source.kind == "hub":
        return download_from_hub(source.name, configs_only=False, variant=variant)
    spec = load_builtin(source.name)
    target = builtin_folder(spec, seed)
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            write_builtin(spec, tmp, seed=seed, device=device, progress=progress)
    return target


def builtin_folder(spec: BuiltinSpec, seed: int) -> Path:
    key = f"{spec.digest()}:{seed}:{WEIGHTS_SCHEME}".encode()
    return cache_dir() / "models" / f"{spec.name}-{hashlib.sha256(key).hexdigest()[:12]}"


def write_builtin(
    spec: BuiltinSpec, folder: Path, *, seed: int, device: str, progress: bool
) -> None:
    """Write every component of ``spec`` and its model_index.json into ``folder``."""
    import diffusers
    import torch

    for name, entry in spec.model_index.items():
        if not isinstance(entry, list) or entry[0] is None:
            continue  # pipeline settings, or an optional component left out
        library, class_name = entry
        settings = spec.components[name]
        cls = import_component_class(library, class_name)
        if issubclass(cls, torch.nn.Module):
            started = time.perf_counter()
            model = build_on_meta(library, class_name, settings)
            params = sum(p.numel() for p in model.parameters())
            _report(progress, f"building {spec.name}: {name} ({_count(params)} params)… ")
            _fill_random(model, getattr(torch, spec.save_dtype), device, _seed(seed, name))
            _save_without_progress_bar(model, folder / name)
            del model
            # Free it before the next component even if it sits in a reference cycle. A full
            # collection takes ~0.4 s once diffusers is imported: only worth it for big models.
            if params >= COLLECT_AFTER_PARAMS:
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            _report(progress, f"{time.perf_counter() - started:.1f} s\n")
        elif issubclass(cls, diffusers.SchedulerMixin):
            cls.from_config(settings).save_pretrained(folder / name)
        else:
            build_tokenizer(class_name, settings).save_pretrained(folder / name)
    model_index: dict[str, Any] = {"_diffusers_version": diffusers.__version__, **spec.model_index}
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def _fill_random(model: nn.Module, dtype: torch.dtype, device: str, seed: int) -> None:
    """Allocate ``model`` (built on meta) on ``device`` in ``dtype`` and fill it in place:
    matrices and kernels ~ N(0, 1/fan_in), which keeps activations of the order of their inputs
    through every layer; biases 0; 1-D weights (norm scales) 1."""
    import torch

    _refuse_persistent_buffers(model)
    # On meta this only changes the recorded dtype. nn.Module's own to(): diffusers' override
    # warns about "modules to keep in float32" on every dtype cast, even when there are none.
    torch.nn.Module.to(model, dtype=dtype)
    model.to_empty(device=device)
    tie_weights = getattr(model, "tie_weights", None)
    if tie_weights is not None:  # transformers: to_empty replaced tied parameters separately
        tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.normal_(0.0, fan_in**-0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    model.eval()  # transformers models are built in train mode (dropout on)


def _save_without_progress_bar(model: nn.Module, folder: Path) -> None:
    """save_pretrained, minus transformers' per-shard bar (it would cut our progress line)."""
    from transformers.utils import logging as transformers_logging

    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)  # type: ignore[operator]
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def _refuse_persistent_buffers(model: nn.Module) -> None:
    """Saved buffers (as opposed to parameters) would hold to_empty's garbage; none of the
    shipped architectures has any, and a new one must not slip through silently."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    saved_buffers = [key for key in model.state_dict() if key not in params]
    if saved_buffers:
        raise NotImplementedError(f"cannot synthesize saved buffers {saved_buffers[:3]}")


def _seed(seed: int, component: str) -> int:
    """A per-component seed, stable across processes (unlike hash())."""
    return zlib.crc32(f"{seed}:{component}".encode())


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"


def _report(enabled: bool, text: str) -> None:
    if enabled:
        print(text, end="", file=sys.stderr, flush=True)
