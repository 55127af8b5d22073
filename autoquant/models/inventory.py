"""Parameter counts of a pipeline's components, without loading (or even allocating) weights.

Each counted component is instantiated from its config on PyTorch's meta device, so a 12 B-param
transformer costs no RAM and well under a second. Results are cached as JSON under
``cache_dir()/inventory/``, keyed by a hash of the configs (and the library versions that turn a
config into modules), so repeated calls take milliseconds and import nothing heavy.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.core.errors import ModelNotFoundError, error_line
from autoquant.core.fsutil import write_text_atomic
from autoquant.core.paths import cache_dir
from autoquant.models.builtin import load_builtin
from autoquant.models.components import component_role, counted_components
from autoquant.models.groups import resident_params
from autoquant.models.hub import download_from_hub
from autoquant.models.types import ComponentInventory, Family, ModelInventory, ModelSource

if TYPE_CHECKING:
    from torch import nn

# Bump when what is counted, or how, changes: old cache entries then stop matching.
# 2: group_resident_params; 3: linear_in_features; 4: group_streamed_params; 5: a UNet's
# group_resident_params holds its largest block
CACHE_FORMAT = 5

FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}
# What a pipeline runs at when its denoiser config has no sample_size (FluxPipeline's default).
DEFAULT_SIZE_WITHOUT_SAMPLE_SIZE = 1024
# diffusers' fallback when a pipeline has no VAE.
DEFAULT_VAE_SCALE_FACTOR = 8


@dataclass(frozen=True)
class PipelineLayout:
    """A pipeline's ``model_index.json`` and the configs of the components worth counting."""

    model_index: dict[str, Any]
    configs: dict[str, dict[str, Any]]  # component name -> model config, for counted components
    default_size: int | None = None  # a built-in's override of the architecture's default

    def cache_key(self) -> str:
        versions = {lib: metadata.version(lib) for lib in ("diffusers", "transformers")}
        canonical = json.dumps(
            [CACHE_FORMAT, versions, self.model_index, self.configs, self.default_size],
            sort_keys=True,
        ).encode()
        return hashlib.sha256(canonical).hexdigest()


def import_component_class(library: str, class_name: str) -> type:
    """A class named in model_index.json, looked up only in diffusers and transformers (never
    code shipped with a model)."""
    if library == "diffusers":
        import diffusers as module
    elif library == "transformers":
        import transformers as module  # type: ignore[no-redef]
    else:
        raise ModelNotFoundError(
            f"component class {library}.{class_name} is not from diffusers or transformers; "
            "autoquant does not run code that ships with a model"
        )
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ModelNotFoundError(
            f"{library} {module.__version__} has no class {class_name}: upgrade {library}"
        )
    return cls


def build_on_meta(library: str, class_name: str, config: dict[str, Any]) -> nn.Module:
    """The component's modules with every tensor on the meta device (shapes only)."""
    import torch

    cls = import_component_class(library, class_name)
    config = copy.deepcopy(config)  # from_config/from_dict may pop keys from what they are given
    with torch.device("meta"):
        if library == "diffusers":
            model = cls.from_config(config)  # type: ignore[attr-defined]
        else:
            model = cls(cls.config_class.from_dict(config))  # type: ignore[attr-defined]
    assert isinstance(model, torch.nn.Module), f"{class_name} is not a model"
    return model


def count_parameters(model: nn.Module) -> tuple[int, int, tuple[tuple[int, int], ...], int]:
    """(all parameters, nn.Linear weights, those weights per in_features, nn.Linear weights in
    the class's ``_keep_in_fp32_modules``)."""
    from torch import nn

    params = sum(p.numel() for p in model.parameters())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear = sum(m.weight.numel() for m in linears.values())
    by_width: dict[int, int] = {}
    for m in linears.values():
        by_width[m.in_features] = by_width.get(m.in_features, 0) + m.weight.numel()
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    kept = sum(m.weight.numel() for name, m in linears.items() if keep & set(name.split(".")))
    return params, linear, tuple(sorted(by_width.items())), kept


def inventory(source: ModelSource) -> ModelInventory:
    """Parameter counts per component of ``source``, from configs alone; cached on disk."""
    layout = pipeline_layout(source)
    path = cache_dir() / "inventory" / f"{layout.cache_key()}.json"
    data = _read_cached(path)
    if data is None:
        data = _count(layout)
        write_text_atomic(path, json.dumps(data, indent=1))
    return _inventory_from_dict(source, data)


def pipeline_layout(source: ModelSource) -> PipelineLayout:
    """The JSON that ``inventory`` counts from, read and checked without importing torch: the
    CLI calls it first, so a broken model folder is a one-line error before any heavy work."""
    if source.kind == "builtin":
        spec = load_builtin(source.name)
        configs = {name: spec.components[name] for name in counted_components(spec.model_index)}
        return PipelineLayout(spec.model_index, configs, spec.default_size)
    folder = (
        source.local_path
        if source.kind == "local"
        else download_from_hub(source.name, configs_only=True)
    )
    assert folder is not None
    return folder_layout(folder)


def folder_layout(folder: Path) -> PipelineLayout:
    """A diffusers folder's model_index.json and the configs of its counted components; anything
    that is not what diffusers writes there is a ModelNotFoundError naming the file."""
    index_path = folder / "model_index.json"
    model_index = _read_json_object(index_path)
    if not isinstance(model_index.get("_class_name"), str):
        raise ModelNotFoundError(f'{index_path} has no "_class_name" naming the pipeline class')
    for name, entry in model_index.items():
        if component_role(name) is not None and not _is_component_entry(entry):
            raise ModelNotFoundError(
                f"{index_path}: {name!r} must be [library, class name] or [null, null], "
                f"not {json.dumps(entry)[:80]}"
            )
    configs = {}
    for name in counted_components(model_index):
        config_path = folder / name / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(f"{folder}: component {name!r} has no config.json")
        configs[name] = _read_json_object(config_path)
    return PipelineLayout(model_index, configs)


def _is_component_entry(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and all(part is None or isinstance(part, str) for part in entry)
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"cannot read {path}: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
            "re-save or re-download the model folder"
        ) from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(
            f"{path} must hold a JSON object {{...}}, not {json.dumps(data)[:60]}"
        )
    return data


def _count(layout: PipelineLayout) -> dict[str, Any]:
    components = []
    for name, (library, class_name) in counted_components(layout.model_index).items():
        try:
            model = build_on_meta(library, class_name, layout.configs[name])
        except ModelNotFoundError:
            raise
        # A config that parses but does not build its class (wrong types, impossible shapes) is
        # the model folder's problem, not a bug here.
        except Exception as err:
            raise ModelNotFoundError(
                f"component {name!r}: {library}.{class_name} cannot be built from its "
                f"config.json ({error_line(err)})"
            ) from err
        params, linear, by_width, kept = count_parameters(model)
        resident, streamed = resident_params(model, library)
        role = component_role(name)
        assert role is not None
        components.append(
            ComponentInventory(
                name, role, library, class_name, params, linear, by_width, kept, resident, streamed
            ).to_dict()
        )
    if not any(c["role"] == "denoiser" for c in components):
        raise ModelNotFoundError("the pipeline has no unet or transformer component")
    vae = layout.configs.get("vae")
    vae_scale_factor = (
        2 ** (len(vae["block_out_channels"]) - 1) if vae else DEFAULT_VAE_SCALE_FACTOR
    )
    denoiser = next(layout.configs[c["name"]] for c in components if c["role"] == "denoiser")
    sample_size = denoiser.get("sample_size")
    if isinstance(sample_size, list):  # some configs give (height, width)
        sample_size = sample_size[0]
    native = sample_size * vae_scale_factor if sample_size else DEFAULT_SIZE_WITHOUT_SAMPLE_SIZE
    pipeline_class = str(layout.model_index["_class_name"])
    return {
        "family": FAMILIES.get(pipeline_class, "other"),
        "pipeline_class": pipeline_class,
        "default_size": layout.default_size or native,
        "vae_scale_factor": vae_scale_factor,
        "components": components,
    }


def _read_cached(path: Path) -> dict[str, Any] | None:
    """The cached counts, or None if absent or unreadable (a corrupt file is then rewritten)."""
    try:
        data = json.loads(path.read_text())
        _inventory_from_dict(ModelSource("", "builtin", ""), data)  # validates the shape
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


def _inventory_from_dict(source: ModelSource, data: dict[str, Any]) -> ModelInventory:
    return ModelInventory(
        source=source,
        family=data["family"],
        pipeline_class=data["pipeline_class"],
        components=tuple(_component_from_dict(c) for c in data["components"]),
        default_size=int(data["default_size"]),
        vae_scale_factor=int(data["vae_scale_factor"]),
    )


def _component_from_dict(data: dict[str, Any]) -> ComponentInventory:
    pairs = tuple((int(width), int(params)) for width, params in data["linear_in_features"])
    return ComponentInventory(**{**data, "linear_in_features": pairs})
