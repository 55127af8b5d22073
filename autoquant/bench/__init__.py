"""`autoquant bench`: every tier at every VRAM budget, the plan against an exhaustive sweep.

command.py runs the sweep (one subprocess per tier: tier_run.py), budgets.py judges which tiers
fit each budget and what the planner chose there, fidelity.py holds the error metrics, report.py
writes bench.json / bench.md / bench.png. This module holds what they share: the tier spec
written on the command line (``gguf:q4_0``, ``none:bf16+model_cpu_offload``,
``quanto:int8+te+compile``, ``gguf:q8_0+te=bitsandbytes:nf4``,
``bitsandbytes:nf4+cpu_text_encoders``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autoquant.backends import UNQUANTIZED, backend_class, backend_classes, validate_tier_name
from autoquant.backends.tier import MEMORY_OPTIONS, OFFLOAD_OPTIONS, EncoderFormat, Tier
from autoquant.core.errors import AutoquantError
from autoquant.execute.compile import MODES, SCOPES
from autoquant.models.step_cache import NOT_COMPILED
from autoquant.models.types import ModelInventory
from autoquant.probe.types import HardwareProfile

TEXT_ENCODERS = "te"  # "+te": the text encoders are quantized with the denoiser's backend
# "+te=backend:precision": the text encoders quantized by another backend (a mixed tier)
MIXED_TEXT_ENCODERS = "te="
COMPILE = "compile"  # "+compile": the denoiser runs under torch.compile, as its figure says
# "+compile=SCOPE[:MODE]": compiled another way than the calibration's (execute/compile.py SCOPES,
# MODES), to measure which wins
COMPILE_AS = "compile="
# "+first_block_cache[=THRESHOLD]": diffusers' first-block cache on the denoiser (lossy; the
# threshold defaults to planner.cache_threshold's)
FIRST_BLOCK_CACHE = "first_block_cache"
# "+cpu_text_encoders": the text encoders unquantized on the CPU, at the compute dtype
CPU_TEXT_ENCODERS = "cpu_text_encoders"
_VAE_OPTIONS = ("vae_slicing", "vae_tiling")


@dataclass(frozen=True)
class TierSpec:
    """One tier of the sweep as written on the command line: ``backend:precision[+extra...]``,
    each extra a memory option, ``te``, ``te=backend:precision``, ``compile``,
    ``compile=SCOPE[:MODE]``, ``first_block_cache[=THRESHOLD]`` or ``cpu_text_encoders``."""

    backend: str
    precision: str
    text_encoders: bool = False
    memory_options: tuple[str, ...] = ()  # in the order of backends.tier.MEMORY_OPTIONS
    compile: bool = False
    encoders: str | None = None  # "backend:precision" of text encoders another backend quantizes
    compile_as: str | None = None  # "SCOPE:MODE" where +compile=… overrides the calibration's
    first_block_cache: float | None = None  # the cache's threshold; None: no step cache
    cpu_text_encoders: bool = False  # the text encoders on the CPU, unquantized

    @classmethod
    def parse(cls, text: str) -> TierSpec:
        head, *extras = text.strip().split("+")
        backend, sep, precision = head.partition(":")
        if not sep:
            raise AutoquantError(f"tier {text!r}: write backend:precision, e.g. gguf:q4_0")
        try:
            validate_tier_name(backend, precision)
        except ValueError as err:
            raise AutoquantError(f"tier {text!r}: {err}") from None
        known = (TEXT_ENCODERS, COMPILE, FIRST_BLOCK_CACHE, CPU_TEXT_ENCODERS, *MEMORY_OPTIONS)
        mixed = [e.removeprefix(MIXED_TEXT_ENCODERS) for e in extras if e.startswith("te=")]
        compile_as = [_compile_as(text, e) for e in extras if e.startswith(COMPILE_AS)]
        cached = [_threshold(text, e) for e in extras if e.partition("=")[0] == FIRST_BLOCK_CACHE]
        unknown = [
            e
            for e in extras
            if e not in known
            and not e.startswith((MIXED_TEXT_ENCODERS, COMPILE_AS))
            and e.partition("=")[0] != FIRST_BLOCK_CACHE
        ]
        if unknown:
            raise AutoquantError(
                f"tier {text!r}: unknown extra {unknown[0]!r}; choose from {', '.join(known)}"
            )
        if TEXT_ENCODERS in extras and not backend_class(backend).quantizes_text_encoders():
            able = [b.name for b in backend_classes() if b.quantizes_text_encoders()]
            raise AutoquantError(
                f"tier {text!r}: +te needs a backend that quantizes text encoders "
                f"({', '.join(able)}); offload them instead (+model_cpu_offload)"
            )
        for encoders in mixed:
            encoder_backend, _, encoder_precision = encoders.partition(":")
            try:
                validate_tier_name(encoder_backend, encoder_precision or None)
            except ValueError as err:
                raise AutoquantError(f"tier {text!r}: +te=: {err}") from None
            if (
                not encoder_precision
                or not backend_class(encoder_backend).quantizes_text_encoders()
            ):
                raise AutoquantError(
                    f"tier {text!r}: +te= takes a backend that quantizes text encoders and its "
                    "precision, e.g. +te=bitsandbytes:nf4"
                )
        if len(mixed) + (TEXT_ENCODERS in extras) + (CPU_TEXT_ENCODERS in extras) > 1:
            raise AutoquantError(f"tier {text!r}: give the text encoders one format")
        if len(compile_as) + (COMPILE in extras) > 1:
            raise AutoquantError(f"tier {text!r}: compile it one way")
        if len(cached) > 1:
            raise AutoquantError(f"tier {text!r}: give the first-block cache one threshold")
        if cached and (compile_as or COMPILE in extras):
            raise AutoquantError(
                f"tier {text!r}: a first-block cache is not compiled ({NOT_COMPILED}); drop "
                "+compile or the cache"
            )
        if CPU_TEXT_ENCODERS in extras and any(o in extras for o in OFFLOAD_OPTIONS):
            raise AutoquantError(
                f"tier {text!r}: +{CPU_TEXT_ENCODERS} keeps the rest resident; drop the offload"
            )
        if sum(o in extras for o in OFFLOAD_OPTIONS) > 1:
            raise AutoquantError(f"tier {text!r}: choose one of {' or '.join(OFFLOAD_OPTIONS)}")
        return cls(
            backend,
            precision,
            text_encoders=TEXT_ENCODERS in extras,
            memory_options=tuple(o for o in MEMORY_OPTIONS if o in extras),
            compile=COMPILE in extras or bool(compile_as),
            encoders=mixed[0] if mixed else None,
            compile_as=compile_as[0] if compile_as else None,
            first_block_cache=cached[0] if cached else None,
            cpu_text_encoders=CPU_TEXT_ENCODERS in extras,
        )

    @property
    def offloaded(self) -> bool:
        return any(o in OFFLOAD_OPTIONS for o in self.memory_options)

    @classmethod
    def of_tier(cls, tier: Tier) -> TierSpec:
        """The spec of a planned tier (what the planner chose), for matching measured tiers."""
        return cls(
            tier.backend,
            tier.precision,
            text_encoders=len(tier.quantized_components) > 1,
            memory_options=tier.memory_options,
            compile=tier.compiled,
            encoders=tier.encoders.name if tier.encoders else None,
            first_block_cache=tier.first_block_cache,
            cpu_text_encoders=tier.cpu_text_encoders,
        )

    @property
    def name(self) -> str:
        """The canonical spelling: extras in a fixed order, so equal specs compare equal."""
        extras = [TEXT_ENCODERS] if self.text_encoders else []
        extras += [MIXED_TEXT_ENCODERS + self.encoders] if self.encoders else []
        extras += [CPU_TEXT_ENCODERS] if self.cpu_text_encoders else []
        extras += list(self.memory_options)
        if self.compile:
            extras += [COMPILE_AS + self.compile_as if self.compile_as else COMPILE]
        if self.first_block_cache is not None:
            extras.append(f"{FIRST_BLOCK_CACHE}={self.first_block_cache:g}")
        return f"{self.backend}:{self.precision}" + "".join(f"+{e}" for e in extras)

    @property
    def file_stem(self) -> str:
        """The name as a file name of plain characters (``quanto-int8-te-model_cpu_offload``)."""
        return self.name.replace(":", "-").replace("+", "-").replace("=", "-")

    @property
    def compile_scope_mode(self) -> tuple[str, str] | None:
        """The override's (scope, mode); None: compiled as the calibration says."""
        if not self.compile_as:
            return None
        scope, _, mode = self.compile_as.partition(":")
        return scope, mode

    def without_vae_options(self) -> TierSpec:
        """The same tier without VAE slicing/tiling: they change only the decode (its memory, and
        a little of the end-to-end time), so the plain tier stands in when the plan's exact tier
        was not measured."""
        kept = tuple(o for o in self.memory_options if o not in _VAE_OPTIONS)
        return replace(self, memory_options=kept)

    def tier(self, inventory: ModelInventory, compute_dtype: str) -> Tier:
        """The planner's Tier for this spec on ``inventory``; ``compute_dtype`` is what a
        quantized tier computes in (an unquantized one computes in its own precision)."""
        encoders = None
        if self.encoders:
            encoder_backend, _, encoder_precision = self.encoders.partition(":")
            names = tuple(c.name for c in inventory.text_encoders)
            encoders = EncoderFormat(encoder_backend, encoder_precision, names)
        if self.backend == UNQUANTIZED:
            return Tier(
                UNQUANTIZED,
                self.precision,
                self.precision,
                (),
                self.memory_options,
                encoders,
                self.compile,
                self.first_block_cache,
                self.cpu_text_encoders,
            )
        components: tuple[str, ...] = (inventory.denoiser.name,)
        if self.text_encoders:
            components += tuple(c.name for c in inventory.text_encoders)
        return Tier(
            self.backend,
            self.precision,
            compute_dtype,
            components,
            self.memory_options,
            encoders,
            self.compile,
            self.first_block_cache,
            self.cpu_text_encoders,
        )


def _threshold(text: str, extra: str) -> float:
    """``first_block_cache[=THRESHOLD]`` → the threshold, planner.cache_threshold's by default,
    checked as --cache-threshold is."""
    from argparse import ArgumentTypeError

    from autoquant.cli.args import cache_threshold
    from autoquant.planner.rules import load_settings

    _, sep, value = extra.partition("=")
    if not sep:
        return float(load_settings()["planner"]["cache_threshold"])
    try:
        return cache_threshold(value)
    except ArgumentTypeError as err:
        raise AutoquantError(f"tier {text!r}: +first_block_cache=THRESHOLD: {err}") from None


def _compile_as(text: str, extra: str) -> str:
    """``compile=SCOPE[:MODE]`` → ``SCOPE:MODE``, checked against execute/compile.py's names."""
    scope, _, mode = extra.removeprefix(COMPILE_AS).partition(":")
    mode = mode or MODES[0]
    if scope not in SCOPES or mode not in MODES:
        raise AutoquantError(
            f"tier {text!r}: +compile=SCOPE[:MODE] takes a scope of {', '.join(SCOPES)} and a "
            f"mode of {', '.join(MODES)}"
        )
    return f"{scope}:{mode}"


def parse_tier_list(text: str) -> list[TierSpec]:
    """``none:bf16,gguf:q4_0`` → specs, duplicates dropped, order kept."""
    specs: list[TierSpec] = []
    for item in text.split(","):
        if item.strip():
            spec = TierSpec.parse(item)
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise AutoquantError("--tiers names no tier: write e.g. none:bf16,gguf:q4_0 or all")
    return specs


def bench_device(profile: HardwareProfile) -> str:
    """Where the sweep runs: the probe's GPU ("cuda", ROCm included), else the CPU."""
    if not profile.has_gpu:
        return "cpu"
    return "cuda" if profile.accelerator in ("cuda", "rocm") else profile.accelerator
