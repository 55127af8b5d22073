"""Single-file checkpoints: one ``.safetensors`` in the original Stable Diffusion (SD1.5, SDXL) or
Flux key layout, turned once into a diffusers folder in the cache and planned like any folder.

The file is read twice at most: its header (tensor names, shapes and dtypes, through safetensors'
``safe_open``) to tell what it holds, and, once per content, its bytes for a sha256 and for
diffusers' ``from_single_file``. The architecture's configs come from ``--config`` (a diffusers
folder, or ``builtin:NAME``) or, without it, from the one built-in whose shapes match the file's
tensors. Nothing is downloaded: diffusers is handed a local config folder with
``local_files_only=True``, and a component the file does not hold is loaded from the config
folder's own safetensors weights or refused.

The converted folder is named by the file's content hash and the config's identity, so a file
replaced under the same name (same size and mtime included) is converted again, and copies of one
file share one conversion. The hash of a path is remembered beside the conversions, keyed by its
size, mtime, ctime and inode: any rewrite or replacement changes the ctime or the inode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.core.console import Log, progress_log
from autoquant.core.errors import ModelNotFoundError, error_line
from autoquant.core.fsutil import atomic_dir, write_text_atomic
from autoquant.core.paths import cache_dir
from autoquant.core.units import GB
from autoquant.models.builtin import BuiltinSpec, builtin_names, load_builtin
from autoquant.models.identity import is_component_entry, model_identity
from autoquant.models.inventory import (
    FAMILIES,
    counted_components,
    folder_layout,
    import_component_class,
)
from autoquant.models.types import Family

if TYPE_CHECKING:
    import torch
    from torch import nn

SUFFIX = ".safetensors"
BUILTIN_PREFIX = "builtin:"
# Bump when the conversion's output changes: converted folders' names change with it.
CONVERSION_SCHEME = 1
HASH_CHUNK_BYTES = 16 * 1024**2
# Say so before hashing a file this big: it takes seconds.
ANNOUNCE_HASH_BYTES = GB
# safetensors dtype names -> torch's, for the floating-point weights the conversion keeps.
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
PIPELINE_CLASSES: dict[Family, str] = {family: cls for cls, family in FAMILIES.items()}
FAMILY_NAMES: dict[Family, str] = {
    "sd": "SD1.x",
    "sdxl": "SDXL",
    "flux": "Flux",
    "other": "single-file",
}
UNET = "model.diffusion_model."
FLUX_ANCHOR = "double_blocks.0.img_attn.norm.key_norm.scale"
# Where each pipeline component's tensors sit in an original-layout file, by family.
COMPONENT_PREFIXES: dict[Family, dict[str, tuple[str, ...]]] = {
    "sd": {"unet": (UNET,), "vae": ("first_stage_model.",), "text_encoder": ("cond_stage_model.",)},
    "sdxl": {
        "unet": (UNET,),
        "vae": ("first_stage_model.",),
        "text_encoder": ("conditioner.embedders.0.",),
        "text_encoder_2": ("conditioner.embedders.1.",),
    },
    "flux": {
        "transformer": (UNET + "double_blocks.", "double_blocks."),
        "vae": ("vae.",),
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.t5xxl.",),
    },
}
# The CLIP-L text model in SD1.x, SDXL and Flux files, and SDXL's OpenCLIP-G.
CLIP_PREFIXES = (
    "cond_stage_model.transformer.text_model.",
    "conditioner.embedders.0.transformer.text_model.",
    "text_encoders.clip_l.transformer.text_model.",
)
OPEN_CLIP = "conditioner.embedders.1.model."
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Checkpoint:
    """What a single file's header says: its tensors' shapes, the family their names follow,
    which pipeline components it holds, and the dtype most of its weights are in."""

    path: Path  # absolute
    size: int
    shapes: dict[str, tuple[int, ...]]
    family: Family  # "other" when the names follow no layout autoquant knows
    components: frozenset[str]
    dtype: str  # torch dtype name: "float16", "bfloat16", "float32"

    @property
    def described(self) -> str:
        return f"{FAMILY_NAMES[self.family]} checkpoint {self.path} ({self.size / GB:.2f} GB)"


@dataclass(frozen=True)
class PipelineConfig:
    """The architecture a file is converted with: a built-in's configs or a diffusers folder."""

    label: str  # what to call it in messages: "builtin:sd15" or the folder
    model_index: dict[str, Any]
    builtin: BuiltinSpec | None = None
    folder: Path | None = None

    @property
    def family(self) -> Family:
        return FAMILIES.get(str(self.model_index.get("_class_name")), "other")

    def model_components(self) -> dict[str, tuple[str, str]]:
        """Every component holding weights (denoiser, VAE, text encoders) -> (library, class)."""
        return counted_components(self.model_index)

    def identity(self) -> str:
        if self.builtin is not None:
            return f"{BUILTIN_PREFIX}{self.builtin.name}:{self.builtin.digest()}"
        assert self.folder is not None
        return f"folder:{model_identity(self.folder)}"


def is_single_file(spec: str) -> bool:
    """Whether ``spec`` names a single-file checkpoint (existing or not): a ``.safetensors``
    that is not a folder."""
    return (
        not spec.startswith(BUILTIN_PREFIX)
        and spec.lower().endswith(SUFFIX)
        and not Path(spec).expanduser().is_dir()
    )


def inspect(path: Path, config: str | None) -> tuple[Checkpoint, PipelineConfig]:
    """The file and the config it will be converted with, checked without reading weights or
    importing torch; every problem is one ModelNotFoundError line."""
    checkpoint = read_checkpoint(path)
    if config is not None:
        chosen = read_config(config)
        _check_family(checkpoint, chosen)
    else:
        chosen = matching_builtin(checkpoint)
    _check_components(checkpoint, chosen)
    return checkpoint, chosen


def converted_folder(path: Path, config: str | None, log: Log | None = None) -> Path:
    """The diffusers folder ``path`` converts to with ``config``, converted on first use."""
    say = log or progress_log()
    checkpoint, chosen = inspect(path, config)
    digest = content_sha256(checkpoint, say)
    key = json.dumps([CONVERSION_SCHEME, digest, chosen.identity()]).encode()
    stem = _UNSAFE_NAME.sub("-", checkpoint.path.stem)[:40] or "checkpoint"
    target = conversions_dir() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}"
    if (target / "model_index.json").is_file():
        return target
    say(f"converting {checkpoint.described} once into the cache with {chosen.label} …")
    started = time.perf_counter()
    with atomic_dir(target) as staging:
        _convert(checkpoint, chosen, staging)
    say(f"converted in {time.perf_counter() - started:.1f} s: {target}")
    if chosen.builtin is not None and "tokenizer" in chosen.model_index:
        say(
            f"note: {chosen.label} ships a stand-in tokenizer (one token per character), so "
            "prompts steer a real checkpoint poorly; pass --config a diffusers folder of this "
            "architecture to use its own tokenizer"
        )
    return target


def conversions_dir() -> Path:
    return cache_dir() / "single-file"


def read_checkpoint(path: Path) -> Checkpoint:
    """The header of ``path``: one line for a missing file or one that is not safetensors."""
    from safetensors import SafetensorError, safe_open

    path = path.expanduser().absolute()
    if not path.is_file():
        raise ModelNotFoundError(f"no such file: {path}")
    try:
        # numpy is only the framework tensors would be read into; none are read here.
        with safe_open(str(path), framework="numpy") as handle:
            shapes, dtypes = {}, {}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensor = handle.get_slice(name)
                shapes[name] = tuple(tensor.get_shape())
                dtypes[name] = tensor.get_dtype()
    except (SafetensorError, OSError) as err:
        raise ModelNotFoundError(
            f"{path} is not a safetensors file ({error_line(err)}): is it truncated, or "
            "another format renamed? pass a whole safetensors checkpoint or a diffusers folder"
        ) from None
    family = _family(shapes)
    components = frozenset(
        name
        for name, prefixes in COMPONENT_PREFIXES.get(family, {}).items()
        if any(key.startswith(prefixes) for key in shapes)
    )
    return Checkpoint(
        path=path,
        size=path.stat().st_size,
        shapes=shapes,
        family=family,
        components=components,
        dtype=_weights_dtype(shapes, dtypes),
    )


def read_config(config: str) -> PipelineConfig:
    """``--config``: ``builtin:NAME`` or a diffusers folder (its model_index.json and configs)."""
    if config.startswith(BUILTIN_PREFIX):
        spec = load_builtin(config.removeprefix(BUILTIN_PREFIX))
        return PipelineConfig(config, spec.model_index, builtin=spec)
    folder = Path(config).expanduser().absolute()
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        names = ", ".join(BUILTIN_PREFIX + name for name in builtin_names())
        raise ModelNotFoundError(
            f"--config {config}: not a diffusers folder (with model_index.json) nor one of {names}"
        )
    layout = folder_layout(folder)  # one line for a model_index or config that does not parse
    return PipelineConfig(str(folder), layout.model_index, folder=folder)


def matching_builtin(checkpoint: Checkpoint) -> PipelineConfig:
    """The one built-in of the file's family whose configs give the file's tensor shapes."""
    if checkpoint.family == "other":
        raise ModelNotFoundError(
            f"{checkpoint.path}: its tensor names follow no checkpoint layout autoquant knows "
            "(SD1.x, SDXL or Flux, original layout): pass --config a diffusers folder of its "
            "architecture"
        )
    matches = []
    for name in builtin_names():
        spec = load_builtin(name)
        if FAMILIES.get(spec.pipeline_class) == checkpoint.family and _shapes_fit(checkpoint, spec):
            matches.append(spec)
    if len(matches) != 1:
        found = "no built-in" if not matches else ", ".join(s.name for s in matches)
        raise ModelNotFoundError(
            f"{checkpoint.path} is a {FAMILY_NAMES[checkpoint.family]} checkpoint whose shapes "
            f"match {found}: pass --config a diffusers folder (or builtin:NAME) of its "
            "architecture"
        )
    return PipelineConfig(BUILTIN_PREFIX + matches[0].name, matches[0].model_index, matches[0])


def content_sha256(checkpoint: Checkpoint, log: Log) -> str:
    """The file's sha256, remembered per path until its size, mtime, ctime or inode change."""
    stat = checkpoint.path.stat()
    state = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]
    path_key = hashlib.sha256(os.fsencode(checkpoint.path)).hexdigest()[:16]
    memo = conversions_dir() / "digests" / f"{path_key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["path"] == str(checkpoint.path) and saved["state"] == state:
            return str(saved["sha256"])
    if checkpoint.size >= ANNOUNCE_HASH_BYTES:
        log(f"reading {checkpoint.path} ({checkpoint.size / GB:.2f} GB) to identify it …")
    digest = hashlib.sha256()
    with open(checkpoint.path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    record = {"path": str(checkpoint.path), "state": state, "sha256": digest.hexdigest()}
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(memo, json.dumps(record) + "\n")
    return digest.hexdigest()


def _family(shapes: dict[str, tuple[int, ...]]) -> Family:
    if FLUX_ANCHOR in shapes or UNET + FLUX_ANCHOR in shapes:
        return "flux"
    if UNET + "input_blocks.0.0.weight" not in shapes:
        return "other"
    # SDXL's UNet takes the pooled text embedding and size conditioning (label_emb); its text
    # encoders sit under conditioner.embedders.
    sdxl = UNET + "label_emb.0.0.weight" in shapes or any(
        key.startswith("conditioner.embedders.") for key in shapes
    )
    return "sdxl" if sdxl else "sd"


def _weights_dtype(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> str:
    """The floating-point dtype holding most of the weights, which the conversion keeps (a
    float16 checkpoint must not double in size)."""
    elements: dict[str, int] = {}
    for name, dtype in dtypes.items():
        if dtype in FLOAT_DTYPES:
            count = 1
            for side in shapes[name]:
                count *= side
            elements[dtype] = elements.get(dtype, 0) + count
    return FLOAT_DTYPES[max(elements, key=elements.__getitem__)] if elements else "float32"


def _shapes_fit(checkpoint: Checkpoint, spec: BuiltinSpec) -> bool:
    """Whether every anchor the file holds (a tensor's shape, a count of numbered blocks) is
    what ``spec``'s configs give it."""
    shapes, counts = _anchors(checkpoint, spec)
    for key, shape in shapes.items():
        if key in checkpoint.shapes and checkpoint.shapes[key] != shape:
            return False
    for prefix, count in counts.items():
        found = _count_blocks(checkpoint.shapes, prefix)
        if found and found != count:
            return False
    return True


def _anchors(
    checkpoint: Checkpoint, spec: BuiltinSpec
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Tensor shapes by name, and block counts by the blocks' name prefix, that tell the
    built-ins of one family apart; only those of components the file holds are given."""
    c, held = spec.components, checkpoint.components & set(spec.components)
    shapes: dict[str, tuple[int, ...]] = {}
    counts: dict[str, int] = {}
    if "unet" in held:
        unet = c["unet"]
        widths, layers = unet["block_out_channels"], unet["layers_per_block"]
        shapes[UNET + "input_blocks.0.0.weight"] = (widths[0], unet["in_channels"], 3, 3)
        shapes[UNET + "middle_block.0.in_layers.2.weight"] = (widths[-1], widths[-1], 3, 3)
        # conv_in, then each block's layers and (all but the last's) downsampler.
        counts[UNET + "input_blocks."] = 1 + len(widths) * layers + len(widths) - 1
    if "transformer" in held:
        flux = c["transformer"]
        prefix = UNET if UNET + FLUX_ANCHOR in checkpoint.shapes else ""
        inner = flux["num_attention_heads"] * flux["attention_head_dim"]
        shapes[prefix + "img_in.weight"] = (inner, flux["in_channels"])
        shapes[prefix + "txt_in.weight"] = (inner, flux["joint_attention_dim"])
        counts[prefix + "double_blocks."] = flux["num_layers"]
        counts[prefix + "single_blocks."] = flux["num_single_layers"]
    if "vae" in held:
        vae = c["vae"]
        prefix = "vae." if checkpoint.family == "flux" else "first_stage_model."
        first = vae["block_out_channels"][0]
        shapes[prefix + "encoder.conv_in.weight"] = (first, vae["in_channels"], 3, 3)
        shapes[prefix + "decoder.conv_out.weight"] = (vae["out_channels"], first, 3, 3)
    if "text_encoder" in held:
        clip = c["text_encoder"]
        for text in CLIP_PREFIXES:
            shapes[text + "embeddings.token_embedding.weight"] = (
                clip["vocab_size"],
                clip["hidden_size"],
            )
            counts[text + "encoder.layers."] = clip["num_hidden_layers"]
    if "text_encoder_2" in held and checkpoint.family == "sdxl":
        open_clip = c["text_encoder_2"]
        shapes[OPEN_CLIP + "token_embedding.weight"] = (
            open_clip["vocab_size"],
            open_clip["hidden_size"],
        )
        counts[OPEN_CLIP + "transformer.resblocks."] = open_clip["num_hidden_layers"]
    return shapes, counts


def _count_blocks(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered blocks ``prefix<N>.`` the file holds."""
    return len({key[len(prefix) :].split(".", 1)[0] for key in shapes if key.startswith(prefix)})


def _check_family(checkpoint: Checkpoint, config: PipelineConfig) -> None:
    if checkpoint.family != "other" and config.family != checkpoint.family:
        raise ModelNotFoundError(
            f"{checkpoint.path} is a {FAMILY_NAMES[checkpoint.family]} checkpoint, but --config "
            f"{config.label} is a {config.model_index.get('_class_name')}: pass a "
            f"{PIPELINE_CLASSES[checkpoint.family]} config"
        )


def _check_components(checkpoint: Checkpoint, config: PipelineConfig) -> None:
    """Each weighted component missing from the file must come from the config folder's own
    safetensors weights (a Flux file often holds only the transformer)."""
    if checkpoint.family == "other":
        return  # what the file holds is for diffusers to tell
    missing = [name for name in config.model_components() if name not in checkpoint.components]
    unloadable = [name for name in missing if not _has_safetensors(config, name)]
    if unloadable:
        held = ", ".join(sorted(checkpoint.components)) or "no component"
        raise ModelNotFoundError(
            f"{checkpoint.path} holds {held} but no {', '.join(unloadable)}: pass --config a "
            f"diffusers folder that has {'their' if len(unloadable) > 1 else 'its'} safetensors "
            "weights"
        )


def _has_safetensors(config: PipelineConfig, name: str) -> bool:
    return config.folder is not None and any((config.folder / name).glob(f"*{SUFFIX}"))


def _convert(checkpoint: Checkpoint, config: PipelineConfig, staging: Path) -> None:
    """from_single_file with a local config folder, then save_pretrained into ``staging``."""
    import torch

    dtype = getattr(torch, checkpoint.dtype)
    pipeline_class = import_component_class("diffusers", str(config.model_index["_class_name"]))
    # A hidden name: identity fingerprints skip it, and it is removed before publishing.
    config_folder = staging / ".config" if config.folder is None else config.folder
    if config.builtin is not None:
        write_config_folder(config.builtin, config_folder)
    missing = {
        name: classes
        for name, classes in config.model_components().items()
        if name not in checkpoint.components and checkpoint.family != "other"
    }
    try:
        given = {
            name: _from_folder(config_folder, name, *classes, dtype)
            for name, classes in missing.items()
        }
        with _quiet_loading():
            pipe = pipeline_class.from_single_file(  # type: ignore[attr-defined]
                str(checkpoint.path),
                config=str(config_folder),
                local_files_only=True,
                torch_dtype=dtype,
                **given,
            )
    # Whatever diffusers raises on a file it cannot map (tensors missing, which it leaves on the
    # meta device, or of other shapes) is the file's problem: one line, the cause chained.
    except Exception as exc:
        raise ModelNotFoundError(
            f"converting {checkpoint.path} with {config.label} failed ({error_line(exc)}): if "
            f"{config.label} is not its architecture, pass --config one that is"
        ) from exc
    with _quiet_loading():
        pipe.save_pretrained(staging, safe_serialization=True)
    if config.builtin is not None:
        shutil.rmtree(config_folder)


def _from_folder(
    folder: Path, name: str, library: str, class_name: str, dtype: torch.dtype
) -> nn.Module:
    """A component the file lacks, from the config folder's safetensors weights (never a
    pickle: ``use_safetensors``)."""
    cls = import_component_class(library, class_name)
    module: nn.Module = cls.from_pretrained(  # type: ignore[attr-defined]
        folder, subfolder=name, torch_dtype=dtype, use_safetensors=True
    )
    return module


def write_config_folder(spec: BuiltinSpec, folder: Path) -> None:
    """A diffusers folder of ``spec``'s configs, tokenizers and scheduler, without weights."""
    import diffusers
    import torch

    folder.mkdir(parents=True)
    for name, entry in spec.model_index.items():
        if not is_component_entry(entry):
            continue
        library, class_name = entry
        cls = import_component_class(library, class_name)
        settings = spec.components[name]
        if issubclass(cls, torch.nn.Module):
            (folder / name).mkdir()
            if library == "diffusers":
                config = {"_class_name": class_name, **settings}
                (folder / name / "config.json").write_text(json.dumps(config, indent=2))
            else:
                cls.config_class(**settings).save_pretrained(folder / name)  # type: ignore[attr-defined]
        elif issubclass(cls, diffusers.SchedulerMixin):
            cls.from_config(settings).save_pretrained(folder / name)
        else:
            from autoquant.models.tokenizers import build_tokenizer

            build_tokenizer(class_name, settings).save_pretrained(folder / name)
    model_index = {"_diffusers_version": diffusers.__version__, **spec.model_index}
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' per-component bars and notices would cut our progress
    lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_bar = diffusers_logging.is_progress_bar_enabled()
    transformers_bar = transformers_logging.is_progress_bar_enabled()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Its dtype cast warns about "modules to keep in float32" even when there are none.
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if diffusers_bar:
            diffusers_logging.enable_progress_bar()
        if transformers_bar:
            transformers_logging.enable_progress_bar()
