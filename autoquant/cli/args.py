"""What every autoquant command line shares: argument types, one-line usage errors, and quiet
libraries. Used by `autoquant` itself and by the commands runnable on their own (serve, bench)."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from autoquant.core.units import parse_size

EXIT_USAGE = 2


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


def size_text(text: str) -> str:
    """A memory size such as 8GB; validated now so that `--vram banana` is a usage error."""
    parse_size(text)
    return text


def width_height(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, both multiples of 8 (the VAE's scale)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 1024x1024")
    if int(width) % 8 or int(height) % 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be multiples of 8")
    return int(width), int(height)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(text)


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
    warnings.filterwarnings("ignore", category=UserWarning, module="torchao")
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
