"""What every autoquant command line shares: argument types, one-line usage errors, the tuning
flags (`plan`, `run`, `serve`), and quiet libraries."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, NoReturn

from autoquant.backends import backend_classes, backend_names
from autoquant.core.units import parse_size
from autoquant.execute.lora import LoraFile, parse_lora
from autoquant.execute.tuning import DEFAULT_MODEL, TuneOptions
from autoquant.models.step_cache import STEP_CACHES
from autoquant.planner.rules import (
    BATCH,
    CACHE_THRESHOLD,
    COMPILE_MODES,
    GUIDANCE_SCALE,
    OBJECTIVES,
    SIDE,
    STEPS,
    Range,
)

EXIT_USAGE = 2
# `--dtype` as diffusers-cli run spells it → planner.compute_dtype.
DTYPE_NAMES = {
    "auto": "auto",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
}
# torch.Generator.manual_seed takes -2**63 … 2**64-1 and wraps negative seeds around to
# 2**64 + seed; only the non-negative ones are accepted, so a report's seed is the one used.
MAX_SEED = 2**64 - 1


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints a usage block too) and no abbreviated
    flags (`--vr` must not silently mean `--vram`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_profile_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--profile and --set, as every command that plans takes them."""
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="FILE|PRESET",
        help="YAML profile or shipped preset name; repeatable, later ones win",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one setting, e.g. planner.skip_if_fits=false; repeatable",
    )


def add_model_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help="builtin:NAME, a local diffusers folder, a single-file .safetensors checkpoint "
        "(SD1.x, SDXL or Flux original layout; converted once into the cache), or a hub id "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--variant",
        metavar="NAME",
        help="load the weights variant NAME of the model (diffusers-cli's --variant: fp16 for "
        "*.fp16.safetensors; default: standard weights, or the only variant the model ships)",
    )
    p.add_argument(
        "--config",
        metavar="FOLDER|builtin:NAME",
        help="the architecture of a single-file -m: a diffusers folder (its configs and "
        "tokenizers; weights for components the file lacks) or a built-in (default: the "
        "built-in whose shapes the file's tensors match)",
    )


def add_tier_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--backend/--precision: force a tier, as `plan`, `run` and `serve` take them."""
    p.add_argument("--backend", help=f"force a backend ({', '.join(backend_names())})")
    p.add_argument("--precision", help="force a precision for --backend")
    p.add_argument(
        "--gguf",
        metavar="FILE",
        help="the denoiser's weights from this GGUF file (city96-style K-quants too): the tier "
        "is gguf at the file's type; the rest of the pipeline comes from --model",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPE_NAMES),
        help="compute dtype of everything not quantized (planner.compute_dtype; diffusers-cli's "
        "names: bfloat16 = bf16, float16 = fp16, float32 = fp32; default auto: bf16 where the "
        "device has bf16 units)",
    )
    p.add_argument(
        "--optimize",
        choices=OBJECTIVES,
        help="what decides among plans that fit (planner.optimize; default balanced): the "
        "fastest (speed), the fastest of the best fidelity class within planner."
        "balanced_slowdown of it (balanced), the fastest of the best fidelity class (quality), "
        "or the design card's tree (card)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="compile the denoiser with torch.compile (planner.compile; default auto). A mode "
        "here, where diffusers-cli's --compile takes torch.compile's arguments: auto offers "
        "compiled plans of formats measured compiled, ranked with their compile seconds spread "
        "over planner.expected_images; always compiles every plan that can be (resident, on "
        "CUDA or the CPU); never compiles none. A compile cache is kept per tier, so the next "
        "process compiles warm",
    )
    p.add_argument(
        "--cache",
        choices=STEP_CACHES,
        help="step caching (planner.cache; default none). first-block: diffusers' first-block "
        "cache, skipping the denoiser's later blocks while its first block's output barely "
        "changes between steps. Lossy (its fidelity: docs/benchmarks.md), opt-in, transformer "
        "denoisers only (Flux), never compiled",
    )
    p.add_argument(
        "--cache-threshold",
        type=cache_threshold,
        metavar="T",
        help="the first-block cache's threshold (planner.cache_threshold; default 0.05): the "
        "relative change of the first block's output below which a step skips the rest",
    )


# `--cpu-offload` as diffusers-cli run spells it → the placement every plan must have.
CPU_OFFLOAD_NAMES = {"model": "model_cpu_offload", "group": "group_offload"}


def add_memory_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """diffusers-cli's memory flags, as plan parts every plan must have (force.memory_options);
    the planner still chooses the rest."""
    p.add_argument(
        "--cpu-offload",
        choices=tuple(CPU_OFFLOAD_NAMES),
        help="offload to the CPU: per component (model) or block by block (group: on CUDA "
        "streams where host RAM allows); the planner picks the rest",
    )
    p.add_argument("--vae-tiling", action="store_true", help="decode the image in tiles")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")


def memory_options_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The memory options `add_memory_arguments`' flags require."""
    flags = (("vae_slicing", args.vae_slicing), ("vae_tiling", args.vae_tiling))
    options = [option for option, on in flags if on]
    if args.cpu_offload:
        options.append(CPU_OFFLOAD_NAMES[args.cpu_offload])
    return tuple(options)


def add_tuning_arguments(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, *, size_help: str
) -> None:
    """The flags of a command that tunes and builds (`run`, `serve`)."""
    add_model_argument(p)
    add_profile_arguments(p)
    add_tier_arguments(p)
    add_memory_arguments(p)
    p.add_argument("--vram-limit", type=size_text, help="cap this process's GPU memory (real OOM)")
    p.add_argument("--device", choices=("cuda", "cpu", "mps"), help="run on this device kind")
    p.add_argument("--size", type=width_height, help=size_help)
    p.add_argument("--smoke-steps", type=step_count, default=2, help="steps of the smoke test")
    p.add_argument(
        "--smoke-size", type=side_length, help="side of the smoke test (default: --size)"
    )
    p.add_argument("--retune", action="store_true", help="ignore the saved tuning for this key")
    p.add_argument(
        "--lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA .safetensors file to apply, at SCALE (default 1; diffusers-cli's JSON "
        '{"lora_id": FILE, "lora_scale": S} too); repeatable. Fused where the tier\'s '
        "backend can fuse, else kept as an active adapter; the report says which",
    )


def options_from_args(args: argparse.Namespace, **extra: Any) -> TuneOptions:
    """TuneOptions from the tuning flags every command shares (`run`, `plan`, `serve`)."""
    width, height = args.size if args.size else (None, None)
    return TuneOptions(
        model=args.model,
        variant=args.variant,
        config=args.config,
        profiles=tuple(args.profile),
        overrides=tuple(args.overrides),
        backend=args.backend,
        precision=args.precision,
        optimize=args.optimize,
        compute_dtype=DTYPE_NAMES[args.dtype] if args.dtype else None,
        compile=args.compile,
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        memory_options=memory_options_from_args(args),
        gguf=args.gguf,
        device=args.device,
        width=width,
        height=height,
        **extra,
    )


def tuning_options(args: argparse.Namespace, **extra: Any) -> TuneOptions:
    """TuneOptions from `add_tuning_arguments`' flags."""
    return options_from_args(
        args,
        vram_limit=args.vram_limit,
        smoke_steps=args.smoke_steps,
        smoke_size=args.smoke_size,
        retune=args.retune,
        lora=tuple(args.lora),
        **extra,
    )


def lora_spec(text: str) -> LoraFile:
    """--lora FILE[:SCALE]: its syntax now; the file itself is checked with the other inputs
    (cli/validate.py)."""
    try:
        return parse_lora(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def size_text(text: str) -> str:
    """A memory size such as 8GB; validated now so that `--vram banana` is a usage error."""
    parse_size(text)
    return text


def width_height(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, each side in the range a profile's request.width/height takes."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 1024x1024")
    if not (SIDE.contains(int(width)) and SIDE.contains(int(height))):
        raise argparse.ArgumentTypeError(
            f"size {text!r}: width and height must each be {SIDE.describe()}"
        )
    return int(width), int(height)


def whole_number(valid: Range) -> Callable[[str], int]:
    """An argument type: a whole number in ``valid`` (the range of the setting it stands for)."""

    def parse(text: str) -> int:
        if not text.isdigit() or not valid.contains(int(text)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {valid.describe()}")
        return int(text)

    return parse


positive_int = whole_number(Range(1, None, step=1))
side_length = whole_number(SIDE)
step_count = whole_number(STEPS)
batch_size = whole_number(BATCH)
generator_seed = whole_number(Range(0, MAX_SEED, step=1))


def real_number(valid: Range) -> Callable[[str], float]:
    """An argument type: a number in ``valid`` (the range of the setting it stands for)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not valid.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {valid.describe()}")
        return value

    return parse


guidance_scale = real_number(GUIDANCE_SCALE)
cache_threshold = real_number(CACHE_THRESHOLD)


def quiet_libraries() -> None:
    """The commands print their own progress; keep the libraries' chatter (deprecation notices
    restated once by autoquant, per-component progress bars, optional-kernel probes) off the
    terminal."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    loggers = [name for backend in backend_classes() for name in backend.loggers]
    for name in loggers:
        warnings.filterwarnings("ignore", category=UserWarning, module=name)
    for name in (*loggers, "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
