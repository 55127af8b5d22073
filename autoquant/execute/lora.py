"""LoRA files on a tuned pipeline.

A LoRA is given as ``FILE[:SCALE]`` (or diffusers-cli's ``{"lora_id": FILE, "lora_scale": S}``)
and must be a local safetensors file: pickles are refused, as models/source.py refuses pickled
checkpoints. Each tier loads it with the pipeline's ``load_lora_weights`` once the tier is built,
before its memory options and its smoke test (so the smoke test runs with it, and offloading
hooks are never taken apart and put back by diffusers). Where the backend declares that fusing
works (``QuantBackend.fuses_lora``) the LoRA is fused and its adapter unloaded; elsewhere it stays
an active adapter. Either way it is checked to have taken hold, and a tier where it did not fails
with the reason, as any tier that cannot be built does: a LoRA is never silently dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.backends import backend_class
from autoquant.backends.tier import Tier
from autoquant.core.errors import AutoquantError
from autoquant.core.packages import module_present
from autoquant.models.source import PICKLE_SUFFIXES

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"
# What installs peft>=0.17, the oldest diffusers 0.42 loads LoRAs through
# (diffusers.utils.constants.MIN_PEFT_VERSION): pyproject.toml's lora extra.
PEFT_REQUIREMENT = "autoquant-diffusers[lora]"
# Fusing must keep at least this share of the LoRA's own contribution to a layer's output, else
# the tier fails. Measured on builtin:tiny-sd: fp32 keeps all but 4e-6 of it, bf16 all but 5 %;
# optimum-quanto int8 keeps none (diffusers 0.42.1 fuses nothing into its weights, silently).
_FUSED_SHARE_KEPT = 0.5
# safetensors files open with an 8-byte header length; a header past this is not a LoRA's.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class LoraFile:
    """One LoRA to apply: its safetensors file and the scale of its contribution."""

    path: Path
    scale: float = 1.0


def adapter_names(lora: Sequence[LoraFile]) -> list[str]:
    """The adapter name each LoRA is loaded under, as diffusers-cli names stacked ones."""
    return [f"lora_{index}" for index in range(len(lora))]


def parse_lora(text: str) -> LoraFile:
    """``FILE[:SCALE]`` (the scale after the last colon, where it reads as a number, so a path
    holding a colon still reads as a path) or diffusers-cli's JSON object. Raises ValueError with
    a one-line message."""
    if text.lstrip().startswith("{"):
        return _parse_json(text)
    path, sep, scale_text = text.rpartition(":")
    if sep and path:
        try:
            scale = float(scale_text)
        except ValueError:
            scale = None
        if scale is not None:
            return LoraFile(Path(path).expanduser(), _scale(scale))
    return LoraFile(Path(text).expanduser())


def _scale(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"LoRA scale {value} must be a finite number")
    return value


def _parse_json(text: str) -> LoraFile:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{text!r} is not valid JSON: {err.msg}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("lora_id"), str):
        raise ValueError(f'{text!r}: give {{"lora_id": FILE, "lora_scale": SCALE}}')
    unknown = sorted(set(spec) - {"lora_id", "lora_scale"})
    if unknown:
        raise ValueError(
            f"{text!r}: only lora_id (a local file) and lora_scale are taken, not "
            f"{', '.join(unknown)}"
        )
    scale = spec.get("lora_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{text!r}: lora_scale must be a number")
    return LoraFile(Path(spec["lora_id"]).expanduser(), _scale(float(scale)))


def lora_files(value: Any) -> tuple[LoraFile, ...]:
    """What ``autoquant.load(lora=...)`` takes, as LoraFiles: None, a path, a ``(path, scale)``
    pair, a LoraFile, or a list of those."""
    if value is None:
        return ()
    if _is_pair(value) or isinstance(value, (str, os.PathLike, LoraFile)):
        return (_one_lora(value),)
    if isinstance(value, Sequence):
        return tuple(_one_lora(item) for item in value)
    raise AutoquantError(f"lora={value!r}: pass a path, a (path, scale) pair, or a list of them")


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], (str, os.PathLike))
        and isinstance(value[1], (int, float))
        and not isinstance(value[1], bool)
    )


def _one_lora(item: Any) -> LoraFile:
    if isinstance(item, LoraFile):
        return item
    if isinstance(item, (str, os.PathLike)):
        return LoraFile(Path(item).expanduser())
    if _is_pair(item):
        try:
            return LoraFile(Path(item[0]).expanduser(), _scale(float(item[1])))
        except ValueError as err:
            raise AutoquantError(str(err)) from None
    raise AutoquantError(f"lora item {item!r}: pass a path or a (path, scale) pair")


def check_lora_files(lora: Sequence[LoraFile]) -> None:
    """Raise an AutoquantError (one line) for a LoRA that cannot be loaded: a missing file, a
    folder, a pickle, anything that is not a safetensors file, or peft not installed."""
    for item in lora:
        problem = _file_problem(item.path)
        if problem:
            raise AutoquantError(f"LoRA {item.path}: {problem}")
    if lora and not module_present("peft"):
        raise AutoquantError(
            f"LoRA files load through peft, which is not installed: "
            f"pip install '{PEFT_REQUIREMENT}'"
        )


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return f"is a folder: pass the LoRA's {SAFETENSORS_SUFFIX} file"
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return (
            "is a pickled file, and autoquant loads only safetensors (unpickling can run code the "
            "file carries): where you trust it, convert it once with safetensors' save_file"
        )
    if suffix != SAFETENSORS_SUFFIX:
        return f"is not a {SAFETENSORS_SUFFIX} file"
    return _header_problem(path)


def _header_problem(path: Path) -> str | None:
    """Why the file is not a safetensors file (its 8-byte length, then a JSON object), or None."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
            return "is not a safetensors file (its header length does not fit the file)"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "is not a safetensors file (its header is not JSON)"
    return None if isinstance(header, dict) else "is not a safetensors file"


def lora_key(lora: Sequence[LoraFile]) -> list[list[Any]]:
    """What the tuning cache keys the LoRAs on: each file's name, size and modification time
    (as models/identity.py keys weight files; the bytes are not read). Not the scale: it changes
    neither a tier's memory nor whether the tier builds."""
    records: list[list[Any]] = []
    for item in lora:
        stat = item.path.stat()
        records.append([item.path.name, stat.st_size, stat.st_mtime_ns])
    return records


def fuses_lora(tier: Tier) -> bool:
    """Whether a LoRA is fused on ``tier``: where every backend building a part of it (the
    text encoders' own, in a mixed tier) declares fusing works, since fuse_lora fuses into
    every component the LoRA touches."""
    return all(backend_class(part.backend).fuses_lora for part in tier.parts)


def fusion_note(tier: Tier, label: str) -> str:
    """How ``tier`` carries a LoRA, for the report and the progress line."""
    if fuses_lora(tier):
        return f"LoRA fused into {label}"
    return f"LoRA kept unfused on {label}: fusing quantized weights is not supported"


def lora_report(lora: Sequence[LoraFile], tier: Tier, label: str) -> list[dict[str, Any]]:
    """The report's record of each LoRA on a tier: its file, scale, adapter, fused or not.
    apply_lora does exactly what this says, or the tier fails."""
    fused, note = fuses_lora(tier), fusion_note(tier, label)
    return [
        {"path": str(item.path), "scale": item.scale, "adapter": name, "fused": fused, "note": note}
        for item, name in zip(lora, adapter_names(lora), strict=True)
    ]


def apply_lora(pipe: Any, lora: Sequence[LoraFile], tier: Tier, label: str) -> None:
    """Load ``lora`` into a freshly built tier, set the scales, and fuse where the tier's
    backends declare fusing works; raise if any LoRA did not take hold."""
    if not lora:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise AutoquantError(f"{type(pipe).__name__} takes no LoRA in diffusers")
    names = adapter_names(lora)
    for item, name in zip(lora, names, strict=True):
        pipe.load_lora_weights(
            str(item.path.parent),
            weight_name=item.path.name,
            adapter_name=name,
            use_safetensors=True,  # with it diffusers never falls back to a pickle
            local_files_only=True,
        )
        # diffusers only warns when no key names a component (a LoRA of another model family).
        if not any(_holds(layer, name) for _, _, layer in _lora_layers(pipe)):
            raise AutoquantError(
                f"LoRA {item.path.name} matched no layer of {type(pipe).__name__} on {label}: "
                "is it a LoRA of this model?"
            )
    pipe.set_adapters(names, adapter_weights=[item.scale for item in lora])
    for item, name in zip(lora, names, strict=True):
        if not any(name in layer.active_adapters for _, _, layer in _lora_layers(pipe)):
            raise AutoquantError(f"LoRA {item.path.name} loaded but is not active on {label}")
    if fuses_lora(tier):
        _fuse(pipe, names, label)


def _lora_layers(pipe: Any) -> list[tuple[str, str, Any]]:
    """(component, module path, layer) of every peft layer in the pipeline's components."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        (component_name, path, module)
        for component_name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for path, module in component.named_modules()
        if isinstance(module, BaseTunerLayer)
    ]


def _holds(layer: Any, name: str) -> bool:
    """Whether the peft layer holds weights of the adapter ``name``."""
    return any(name in getattr(layer, attribute, {}) for attribute in layer.adapter_layer_names)


def _fuse(pipe: Any, names: list[str], label: str) -> None:
    """Fuse the adapters into the weights and unload them (as diffusers documents fusing), then
    check on one layer that the fused weights give what the adapter gave."""
    import torch

    probe = _probe(pipe)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0, safe_fusing=True)
    pipe.unload_lora_weights()
    if probe is None:
        return
    component_name, path, x, base, adapted = probe
    with torch.no_grad():
        fused = pipe.components[component_name].get_submodule(path)(x).float()
    contribution = float((adapted - base).norm())
    if contribution == 0.0:
        return  # a zero LoRA (or scale 0) on this layer: nothing that fusing could lose
    lost = float((fused - adapted).norm()) / contribution
    if lost > 1 - _FUSED_SHARE_KEPT:
        raise AutoquantError(
            f"fusing the LoRA into {label} lost {lost:.0%} of its effect: this backend must not "
            "declare fuses_lora"
        )


def _probe(pipe: Any) -> tuple[str, str, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A fixed input to the first LoRA'd linear layer, with that layer's output without and
    with its adapters; None where no linear layer carries one (a LoRA of convolutions only)."""
    import torch

    for component_name, path, layer in _lora_layers(pipe):
        base_layer = layer.get_base_layer()
        if not isinstance(getattr(base_layer, "in_features", None), int):
            continue
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, base_layer.in_features, generator=generator).to(weight.device, dtype)
        with torch.no_grad():
            return component_name, path, x, base_layer(x).float(), layer(x).float()
    return None
