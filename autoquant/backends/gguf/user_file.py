"""A GGUF file of the denoiser that the user brings (`--gguf FILE`), often a city96-style K-quant
of a Flux transformer or an SDXL UNet: what it holds and whether it fits the model, read from its
header and tensor infos alone (no tensor is dequantized, torch is not imported), so that a wrong
file is refused in well under a second.

The denoiser's tier is then gguf at the file's type, loaded with diffusers' ``from_single_file``
as a converted file is (backend.py). diffusers renames a file's keys itself, so both layouts
load: diffusers' own names (what `autoquant convert` writes) and the original checkpoints' (BFL's
Flux names, the LDM names of SD/SDXL UNets, with or without the ``model.diffusion_model.``
prefix).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.backends.gguf.formats import FILE_ONLY_TYPES, GGUF_TYPES
from autoquant.core.errors import AutoquantError
from autoquant.models.inventory import PipelineLayout

# The types a file's denoiser may be planned at: the quantized types diffusers 0.42.1 dequantizes
# (quantizers/gguf/utils.py's dequantize_functions) that autoquant declares bytes and errors for.
PLANNED_TYPES = GGUF_TYPES + FILE_ONLY_TYPES
# Other types diffusers 0.42.1 loads (F32 and F16 as plain tensors); allowed beside the main one.
_OTHER_LOADABLE = ("f32", "f16", "bf16", "iq4_nl", "iq4_xs")
_MAGIC = b"GGUF"
_PREFIX = "model.diffusion_model."
# Each layout (architecture, naming) by the prefix of names that only its files have.
_LAYOUTS = (
    ("flux", "diffusers", "single_transformer_blocks."),
    ("flux", "original", "double_blocks."),
    ("unet", "diffusers", "down_blocks."),
    ("unet", "original", "input_blocks."),
)
# The denoiser classes a file is checked against, by the architecture their files have.
_ARCHITECTURES = {"FluxTransformer2DModel": "flux", "UNet2DConditionModel": "unet"}
_NAMED = {"flux": "a Flux transformer", "unet": "an SD/SDXL UNet"}


@dataclass(frozen=True)
class GgufFile:
    """What a user's GGUF file holds, from its header."""

    path: Path
    precision: str  # the predominant quantized type of its 2-D weights, as autoquant names types
    types: dict[str, int]  # tensors per type ("f32", "q4_k", …)
    shapes: dict[str, tuple[int, ...]]  # each tensor's logical shape, by name (prefix removed)
    tensor_bytes: int  # the bytes of every tensor: the denoiser's weights once loaded

    @property
    def tensor_count(self) -> int:
        return len(self.shapes)

    @property
    def quantized_tensors(self) -> int:
        return sum(n for name, n in self.types.items() if name not in ("f32", "f16"))


def read_gguf_file(path: Path) -> GgufFile:
    """Read ``path``'s header and tensor infos; raise AutoquantError (one line) unless it is a
    GGUF file whose types diffusers can load, with a quantized type autoquant can plan."""
    where = f"--gguf {path}"
    if not path.is_file():
        raise AutoquantError(f"{where}: {'not a file' if path.exists() else 'no such file'}")
    with open(path, "rb") as handle:
        magic = handle.read(len(_MAGIC))
    if magic != _MAGIC:
        raise AutoquantError(f"{where}: not a GGUF file (it does not start with 'GGUF')")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    # A damaged header surfaces as whatever numpy or the parser trips over.
    except Exception as exc:
        raise AutoquantError(
            f"{where}: not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from None
    loadable = set(PLANNED_TYPES) | set(_OTHER_LOADABLE)
    types: collections.Counter[str] = collections.Counter()
    weights_by_type: collections.Counter[str] = collections.Counter()
    shapes: dict[str, tuple[int, ...]] = {}
    tensor_bytes = 0
    for tensor in reader.tensors:
        qtype = tensor.tensor_type.name.lower()
        if qtype not in loadable:
            raise AutoquantError(
                f"{where}: tensor {tensor.name!r} is {qtype}, which diffusers 0.42.1 cannot load "
                f"(it loads {', '.join(sorted(loadable))})"
            )
        types[qtype] += 1
        # ggml lists dimensions innermost first; torch's shape is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shapes[tensor.name.removeprefix(_PREFIX)] = shape
        tensor_bytes += int(tensor.n_bytes)
        if len(shape) == 2 and qtype not in ("f32", "f16", "bf16"):
            weights_by_type[qtype] += int(tensor.n_elements)
    if not weights_by_type:
        raise AutoquantError(f"{where}: no quantized weights (the file holds only float tensors)")
    precision = weights_by_type.most_common(1)[0][0]
    if precision not in PLANNED_TYPES:
        raise AutoquantError(
            f"{where}: its weights are mostly {precision}, which autoquant has no figures for; "
            f"it plans {', '.join(PLANNED_TYPES)}"
        )
    return GgufFile(path, precision, dict(types), shapes, tensor_bytes)


def forced_file(path: str, backend: str | None, precision: str | None) -> GgufFile:
    """The file of `--gguf PATH`, read, and checked against the --backend/--precision beside it:
    the file decides both."""
    if backend not in (None, "gguf"):
        raise AutoquantError(
            f"--gguf loads the denoiser with the gguf backend; drop --backend {backend}"
        )
    weights = read_gguf_file(Path(path))
    if precision not in (None, weights.precision):
        raise AutoquantError(
            f"--gguf {path} is {weights.precision}, not {precision}: drop --precision "
            "(the file decides it)"
        )
    return weights


def check_model(weights: GgufFile, layout: PipelineLayout) -> None:
    """:func:`check_denoiser` against the denoiser of the pipeline ``layout`` describes."""
    for name in ("transformer", "unet"):
        entry = layout.model_index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and name in layout.configs:
            check_denoiser(weights, str(entry[1]), layout.configs[name])
            return
    raise AutoquantError("--gguf: the model has no transformer or unet for the file to stand in")


def check_denoiser(weights: GgufFile, class_name: str, config: Mapping[str, Any]) -> None:
    """Raise AutoquantError (one line) unless ``weights`` holds a denoiser of ``class_name`` with
    ``config``: the architecture its names show, and the shapes and block counts the config sets
    (checked from the names and shapes alone; diffusers checks every tensor when it loads)."""
    expected = _ARCHITECTURES.get(class_name)
    if expected is None:
        known = ", ".join(_ARCHITECTURES)
        raise AutoquantError(
            f"--gguf: the model's denoiser is a {class_name}; a GGUF file can stand in for a "
            f"{known} only"
        )
    found = next(
        ((arch, layout) for arch, layout, marker in _LAYOUTS if _has(weights, marker)), None
    )
    where = f"--gguf {weights.path}"
    if found is None:
        raise AutoquantError(f"{where}: its tensors are not {_NAMED[expected]}'s")
    arch, layout = found
    if arch != expected:
        raise AutoquantError(
            f"{where} holds {_NAMED[arch]}, but the model's denoiser is a {class_name}"
        )
    checks = _flux_checks if arch == "flux" else _unet_checks
    for name, want, have in checks(weights, config, layout == "diffusers"):
        if want != have:
            raise AutoquantError(
                f"{where} does not match the model's {class_name}: {name} is {_say(have)} "
                f"where its config makes it {_say(want)}"
            )


def _has(weights: GgufFile, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in weights.shapes)


def _blocks(weights: GgufFile, prefix: str) -> int:
    """How many numbered blocks ``prefix.N.…`` the file holds."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for name in weights.shapes if (m := pattern.match(name))})


def _say(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) if value else "absent"
    return str(value)


Check = tuple[str, Any, Any]  # what, the config's value, the file's


def _flux_checks(weights: GgufFile, config: Mapping[str, Any], diffusers: bool) -> list[Check]:
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    names = (
        ("x_embedder.weight", "context_embedder.weight", "transformer_blocks")
        if diffusers
        else ("img_in.weight", "txt_in.weight", "double_blocks")
    )
    singles = "single_transformer_blocks" if diffusers else "single_blocks"
    guidance = (
        "time_text_embed.guidance_embedder.linear_1.weight"
        if diffusers
        else "guidance_in.in_layer.weight"
    )
    return [
        (names[0], (inner, int(config["in_channels"])), weights.shapes.get(names[0], ())),
        (names[1], (inner, int(config["joint_attention_dim"])), weights.shapes.get(names[1], ())),
        (f"the number of {names[2]}", int(config["num_layers"]), _blocks(weights, names[2])),
        (f"the number of {singles}", int(config["num_single_layers"]), _blocks(weights, singles)),
        ("a guidance embedder", bool(config.get("guidance_embeds")), guidance in weights.shapes),
    ]


def _unet_checks(weights: GgufFile, config: Mapping[str, Any], diffusers: bool) -> list[Check]:
    conv_in = "conv_in.weight" if diffusers else "input_blocks.0.0.weight"
    channels = tuple(config["block_out_channels"])
    widths = config["cross_attention_dim"]  # one for every block, or one each
    want = sorted({int(w) for w in (widths if isinstance(widths, list) else [widths])})
    cross = sorted({shape[-1] for name, shape in weights.shapes.items() if "attn2.to_k" in name})
    return [
        (conv_in, (channels[0], int(config["in_channels"]), 3, 3), weights.shapes.get(conv_in, ())),
        ("the cross-attention width", want, cross),
    ]
