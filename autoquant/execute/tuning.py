"""probe → plan → execute, shared by `autoquant run`, `autoquant.load()` and the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.backends import validate_tier_name
from autoquant.core.console import Log
from autoquant.core.errors import AutoquantError
from autoquant.core.units import parse_size
from autoquant.execute.compile import cache_folder, warm_labels
from autoquant.execute.ladder import Result, execute
from autoquant.execute.lora import LoraFile, check_lora_files
from autoquant.execute.smoke import SmokeSettings
from autoquant.models.types import ModelInventory
from autoquant.planner.estimate import Request
from autoquant.planner.plan import Plan, plan
from autoquant.planner.rules import load_settings
from autoquant.probe.types import HardwareProfile

DEFAULT_MODEL = "builtin:tiny-sd"


@dataclass(frozen=True)
class TuneOptions:
    model: str = DEFAULT_MODEL
    config: str | None = None  # a single-file model's architecture: folder or builtin:NAME
    variant: str | None = None  # the weights variant to load (diffusers-cli's --variant)
    profiles: Sequence[str] = ()
    overrides: Sequence[str] = ()  # "dotted.key=value"
    backend: str | None = None
    precision: str | None = None
    optimize: str | None = None  # planner.optimize: speed | balanced | quality | card
    compute_dtype: str | None = None  # planner.compute_dtype: auto | bf16 | fp16 | fp32
    compile: str | None = None  # planner.compile: auto | always | never
    expected_images: int | None = None  # planner.expected_images (`serve`: its own figure)
    cache: str | None = None  # planner.cache: none | first-block (lossy, opt-in)
    cache_threshold: float | None = None  # planner.cache_threshold
    # Memory options every plan must have, added to force.memory_options (`--cpu-offload`,
    # `--vae-tiling`, `--vae-slicing`).
    memory_options: tuple[str, ...] = ()
    device: str | None = None  # plan for another machine: cuda | cpu | mps
    vram: str | None = None  # plan for a card of this size (emulated)
    compute_capability: str | None = None
    gpu: str | None = None  # plan for a card of profiles/gpus.yaml (its memory and capability)
    vram_limit: str | None = None  # cap this process's real GPU memory (a real OOM past it)
    width: int | None = None
    height: int | None = None
    batch: int | None = None
    steps: int | None = None
    smoke_steps: int = 2
    smoke_size: int | None = None  # default: the requested size
    progress: bool = True
    use_cache: bool = True  # consult and update the tuning cache
    retune: bool = False  # ignore a saved decision (and replace it)
    lora: tuple[LoraFile, ...] = ()  # LoRA files every tier built takes (execute/lora.py)
    gguf: str | None = None  # the user's GGUF file of the denoiser: its weights, its tier


def settings_for(options: TuneOptions) -> dict[str, Any]:
    overrides = list(options.overrides)
    weights = None
    if options.gguf:
        from autoquant.backends.gguf.user_file import forced_file

        weights = forced_file(options.gguf, options.backend, options.precision)
    elif options.backend:
        try:
            validate_tier_name(options.backend, options.precision)
        except ValueError as err:
            raise AutoquantError(f"--backend/--precision: {err}") from None
        overrides.append(f"force.backend={options.backend}")
    if options.precision and not weights:
        if not options.backend:
            raise AutoquantError(
                "--precision needs --backend (e.g. --backend gguf --precision q4_0)"
            )
        overrides.append(f"force.precision={options.precision}")
    if options.optimize:
        overrides.append(f"planner.optimize={options.optimize}")
    if options.compute_dtype:
        overrides.append(f"planner.compute_dtype={options.compute_dtype}")
    if options.compile:
        overrides.append(f"planner.compile={options.compile}")
    if options.expected_images:
        overrides.append(f"planner.expected_images={options.expected_images}")
    if options.cache:
        overrides.append(f"planner.cache={options.cache}")
    if options.cache_threshold is not None:
        overrides.append(f"planner.cache_threshold={options.cache_threshold!r}")
    settings = load_settings(options.profiles, overrides)
    if options.cache_threshold is not None and settings["planner"]["cache"] == "none":
        raise AutoquantError("--cache-threshold needs --cache first-block (planner.cache)")
    required = settings["force"]["memory_options"]
    required += [o for o in options.memory_options if o not in required]
    if weights is not None:
        # The file's tier, forced past the profile's vocabulary (its K-quants are no precision
        # autoquant converts to); force.gguf makes the planner plan only that tier's memory
        # options (planner/plan.py _from_file) and the executor load the file (ladder.py).
        settings["force"].update(
            backend="gguf", precision=weights.precision, gguf=str(weights.path.resolve())
        )
    return settings


def probe_for(options: TuneOptions, settings: dict[str, Any]) -> HardwareProfile:
    """The probe, with the machine the user asked to plan for (CLI flags over profile keys).
    With --vram-limit the real card is probed and its size replaced by the cap. A named card
    (--gpu, hardware.gpu) stands for the whole machine: a --gpu flag overrides every hardware
    key, and any of --vram, --device and --compute-capability overrides hardware.gpu."""
    from autoquant.probe import emulate, probe

    hardware = settings["hardware"]
    machine_flags = (options.vram, options.device, options.compute_capability)
    gpu = options.gpu or (None if any(machine_flags) else hardware["gpu"])
    if gpu:
        if options.vram_limit:
            raise AutoquantError(
                "--vram-limit caps a real GPU; it cannot go with a named one (hardware.gpu)"
            )
        given = [key for key in ("vram", "device", "compute_capability") if hardware[key]]
        if not options.gpu and given:
            raise AutoquantError(
                f"hardware.gpu names a card with its memory and capability; drop "
                f"{', '.join(f'hardware.{key}' for key in given)}"
            )
        return probe(gpu=gpu)
    device = options.device or hardware["device"]
    capability = options.compute_capability or hardware["compute_capability"]
    capability = str(capability) if capability else None
    if options.vram_limit:
        real = probe(device=device)
        if real.accelerator not in ("cuda", "rocm") or "accelerator" in real.emulated:
            raise AutoquantError("--vram-limit caps a real CUDA GPU; this machine has none")
        return emulate(real, vram=parse_size(options.vram_limit))
    vram_text = options.vram or hardware["vram"]
    vram = parse_size(str(vram_text)) if vram_text is not None else None
    return probe(vram=vram, device=device, compute_capability=capability)


def request_for(options: TuneOptions, settings: dict[str, Any], default_size: int) -> Request:
    req = settings["request"]
    width = options.width or req["width"] or default_size
    height = options.height or req["height"] or default_size
    if width % 8 or height % 8:
        raise AutoquantError(f"size {width}x{height}: width and height must be multiples of 8")
    return Request(
        width=width,
        height=height,
        batch=options.batch or req["batch"],
        steps=options.steps or req["steps"],
    )


def check_variant(options: TuneOptions) -> None:
    """A --variant is a variant name, and one that a local folder ships (a hub repo's files are
    checked as they download, a built-in's once it is built)."""
    if options.variant is None:
        return
    from autoquant import models
    from autoquant.models.variant import check_variant_name, weights_variant

    check_variant_name(options.variant)
    source = models.resolve(options.model, options.config)
    if source.local_path is not None:
        weights_variant(source.local_path, options.variant)


def make_plan(options: TuneOptions) -> tuple[Plan, HardwareProfile, ModelInventory]:
    """The plan, the (possibly emulated) machine it is for, and the model it counted."""
    from autoquant import models

    check_variant(options)
    settings = settings_for(options)
    profile = probe_for(options, settings)
    source = models.resolve(options.model, options.config)
    if options.gguf:  # before counting the model: a wrong file is refused at once
        from autoquant.backends.gguf.user_file import check_model, read_gguf_file
        from autoquant.models.inventory import pipeline_layout

        check_model(read_gguf_file(Path(options.gguf)), pipeline_layout(source))
    inventory = models.inventory(source)
    request = request_for(options, settings, inventory.default_size)
    # The tiers whose compile cache is here: the planner prices their compile warm. They are
    # looked up where the smoke test compiles (its size, one image: execute/ladder.py), so a
    # plan for a batch, or a smoke test of another size, is priced cold.
    warm = warm_labels(
        cache_folder(
            profile,
            inventory,
            width=options.smoke_size or request.width,
            height=options.smoke_size or request.height,
            batch=request.batch,
        )
    )
    return plan(profile, inventory, settings, request, warm), profile, inventory


def tune(options: TuneOptions, log: Log | None = None) -> Result:
    """Plan and build ``options.model``. With the tuning cache, a machine/model/settings seen
    before goes straight to the saved tier (smoke-tested with one step) and skips tiers that ran
    out of memory here; the outcome is saved for next time."""
    from autoquant import models
    from autoquant.execute import memory
    from autoquant.execute.tuning_entry import (
        entry_for,
        free_bytes,
        known_oom,
        saved_index,
        tuning_key,
    )
    from autoquant.models.identity import model_identity
    from autoquant.models.variant import weights_variant
    from autoquant.store.tuning_store import TuningStore

    say = log or (lambda _m: None)
    check_lora_files(options.lora)
    the_plan, profile, inventory = make_plan(options)
    if options.vram_limit:
        memory.emulate_card(the_plan.device, parse_size(options.vram_limit))
    source = models.resolve(options.model, options.config)
    folder = models.materialize(source, progress=options.progress, variant=options.variant)
    variant = weights_variant(folder, options.variant)
    smoke = SmokeSettings(
        steps=options.smoke_steps,
        width=options.smoke_size or the_plan.request.width,
        height=options.smoke_size or the_plan.request.height,
    )
    start, skip, cache = 0, set[str](), None
    store = key = previous = None
    if options.use_cache:
        store = TuningStore(warn=say)
        key = tuning_key(profile, the_plan, model_identity(folder), options.lora)
        previous = None if options.retune else store.get(key.digest)
        index = saved_index(previous, the_plan) if previous else None
        cache = {"key": key.digest, "path": str(store.path), "hit": index is not None}
        if previous is not None and index is not None:
            oom_here = known_oom(previous, free_bytes(profile))
            start, skip = index, oom_here - {the_plan.ladder[index].label}
            smoke = SmokeSettings(steps=1, width=smoke.width, height=smoke.height)
            say(f"tuning cache hit ({key.digest}): straight to {the_plan.ladder[index].label}")
        elif options.retune:
            say(f"--retune: ignoring the tuning cache entry {key.digest}")
    result = execute(
        the_plan,
        profile,
        folder=folder,
        inventory=inventory,
        smoke=smoke,
        start=start,
        skip=skip,
        progress=options.progress,
        log=log,
        lora=options.lora,
        variant=variant,
    )
    result.cache = cache
    if store is not None and key is not None:
        broken = [a for a in result.attempts if a.outcome == "error"]
        if broken:
            # A tier that broke (not one that ran out of memory) says nothing about what fits:
            # saving the fallback as the choice would skip the broken tier once it is repaired.
            say(f"not saving the tuning decision: {broken[0].label} failed ({broken[0].error})")
        else:
            retune = options.retune
            store.update(
                key.digest, lambda current: entry_for(key, result, None if retune else current)
            )
    return result
