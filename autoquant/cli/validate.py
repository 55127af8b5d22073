"""The checks a command's input gets before any heavy import or work: the settings load, a
--gpu names a known card, the model's JSON parses, the output and cache folders can be written.
Each raises an AutoquantError (one line, exit 2), so a bad input is reported in well under a
second, and nothing is written.

Argument syntax and ranges are checked earlier, by the argument types in cli/args.py.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from autoquant.cli.args import options_from_args
from autoquant.core.errors import AutoquantError
from autoquant.core.paths import cache_dir
from autoquant.execute.lora import check_lora_files
from autoquant.execute.tuning import settings_for
from autoquant.models import resolve
from autoquant.models.inventory import pipeline_layout
from autoquant.models.single_file import inspect, is_single_file
from autoquant.probe.gpu_table import find_gpu


def folder_problem(path: Path) -> str | None:
    """Why files cannot be written in the folder ``path`` (created on demand), or None: its
    nearest existing part (``path`` itself, or an ancestor) is not a folder, or is not writable
    (permissions, a read-only filesystem). Looks only; creates nothing."""
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_settings(args: argparse.Namespace) -> None:
    """Profiles, --set and --backend/--precision load and validate (planner/rules.py)."""
    settings_for(options_from_args(args))


def check_gpu(args: argparse.Namespace) -> None:
    """--gpu names a card of profiles/gpus.yaml and comes alone: the card is the machine."""
    if args.gpu is None:
        return
    flags = {
        "--vram": args.vram,
        "--device": args.device,
        "--compute-capability": args.compute_capability,
    }
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise AutoquantError(
            f"--gpu {args.gpu!r} comes with its memory and compute capability; drop "
            f"{', '.join(given)}"
        )
    find_gpu(args.gpu)


def check_model(args: argparse.Namespace) -> None:
    """The model resolves, and a folder's model_index.json and component configs parse; a
    single-file checkpoint's header and --config are read (its conversion comes later)."""
    config = getattr(args, "config", None)
    if is_single_file(args.model):
        inspect(Path(args.model), config)
    else:
        pipeline_layout(resolve(args.model, config))


def check_gguf(args: argparse.Namespace) -> None:
    """--gguf's file holds the model's denoiser: its tensor names and shapes against the
    model's configs (check_settings has read the file itself)."""
    if args.gguf is None or is_single_file(args.model):  # a single file's layout comes later
        return
    from autoquant.backends.gguf.user_file import check_model as check_file
    from autoquant.backends.gguf.user_file import read_gguf_file

    layout = pipeline_layout(resolve(args.model, getattr(args, "config", None)))
    check_file(read_gguf_file(Path(args.gguf)), layout)


def check_out(args: argparse.Namespace) -> None:
    problem = folder_problem(args.out)
    if problem:
        raise AutoquantError(
            f"--out {args.out}: {problem}: pick a folder autoquant can write "
            "(image.png, report.json and report.md go there)"
        )


def check_cache(_args: argparse.Namespace) -> None:
    path = cache_dir()
    problem = folder_problem(path)
    if problem:
        raise AutoquantError(
            f"cache folder {path} is unusable ({problem}): set AUTOQUANT_CACHE_DIR to a "
            "writable folder"
        )


def check_lora(args: argparse.Namespace) -> None:
    """Each --lora is a safetensors file (never a pickle), and peft is there to load it."""
    check_lora_files(args.lora)


Check = Callable[[argparse.Namespace], None]
# What each command reads or writes before its heavy work starts; commands not listed need none.
# The model comes last: a hub id may wait up to HUB_CONNECT_TIMEOUT_S for the network.
CHECKS: dict[str, tuple[Check, ...]] = {
    "probe": (check_gpu,),
    "plan": (check_gpu, check_settings, check_cache, check_model, check_gguf),
    "run": (check_settings, check_out, check_cache, check_lora, check_model, check_gguf),
    "serve": (check_settings, check_cache, check_lora, check_model, check_gguf),
    "convert": (check_model,),
    "cache": (check_cache,),
}


def validate(args: argparse.Namespace) -> None:
    """Every check of ``args.command``, in order; the first failure raises."""
    for check in CHECKS.get(args.command, ()):
        check(args)
