"""The latency model: predicted seconds for one image of a planned tier on a target machine, from
parameter counts, the request, the tier's format and placement, and measured calibration
(profiles/latency.yaml, which names the measurement behind every figure).

An image costs its denoising steps (each a forward at the format's measured speed, plus the
weights streamed per step under group offload), the weights swapped in and out once under model
CPU offload, text encoding and the VAE's decode. Loading (reading, quantizing, GGUF's one-time
conversion) is predicted apart, as the first call's cost: the choice ranks what a user waits for
each image once the pipeline is up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import yaml

from autoquant.backends import UNQUANTIZED
from autoquant.backends.tier import Tier
from autoquant.core.errors import ConfigError
from autoquant.core.paths import profiles_dir
from autoquant.core.units import GB
from autoquant.models.types import ComponentInventory, ModelInventory
from autoquant.planner.estimate import CFG_FAMILIES, Estimate, Request
from autoquant.probe.gpu_table import GpuSpec, find_gpu, spec_for
from autoquant.probe.types import CpuInfo, HardwareProfile

CALIBRATION_FILE = "latency.yaml"
# Tokens each text encoder reads: CLIP's 77; T5's 512 (Flux's max_sequence_length).
_TOKENS = {"CLIPTextModel": 77, "CLIPTextModelWithProjection": 77}
_T5_TOKENS = 512


@dataclass(frozen=True)
class Latency:
    """Predicted seconds of one generation (``request.batch`` images) of one tier."""

    step_seconds: float  # one denoising step: the forward, and any weights streamed for it
    steps: int
    swap_seconds: float  # model CPU offload's moves, once per generation
    text_seconds: float
    vae_seconds: float
    first_call_seconds: float  # loading and quantizing (GGUF's conversion too, when not cached)
    basis: str  # what the figures are scaled from, in words
    # A compiled denoiser's first call compiling it (warm: from a saved compile cache); once.
    compile_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        """One generation, loading excluded."""
        return (
            self.steps * self.step_seconds
            + self.swap_seconds
            + self.text_seconds
            + self.vae_seconds
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "step_seconds": round(self.step_seconds, 4),
            "steps": self.steps,
            "swap_seconds": round(self.swap_seconds, 3),
            "text_seconds": round(self.text_seconds, 3),
            "vae_seconds": round(self.vae_seconds, 3),
            "first_call_seconds": round(self.first_call_seconds, 1),
            "compile_seconds": round(self.compile_seconds, 1),
            "basis": self.basis,
        }


@cache
def calibration() -> dict[str, Any]:
    """profiles/latency.yaml, read once."""
    path = profiles_dir() / CALIBRATION_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the latency calibration: {err}") from None
    if not isinstance(data, dict) or not {"gpu", "cpu"} <= set(data):
        raise ConfigError(f"{path}: the latency calibration needs 'gpu' and 'cpu' sections")
    return data


def cpu_kind(cpu: CpuInfo) -> str:
    """The calibration's CPU kind: "amx", "avx512" or "avx2"."""
    flags = set(cpu.flags)
    if "amx_bf16" in flags:
        return "amx"
    return "avx512" if "avx512f" in flags else "avx2"


def _denoiser_kind(inventory: ModelInventory) -> str:
    return "transformer" if "Transformer" in inventory.denoiser.class_name else "unet"


def _step_units(inventory: ModelInventory, request: Request) -> float:
    latent = (request.width // inventory.vae_scale_factor) * (
        request.height // inventory.vae_scale_factor
    )
    batch = request.batch * (2 if inventory.family in CFG_FAMILIES else 1)
    return float(inventory.denoiser.params) * latent * batch


def text_tokens(component: ComponentInventory) -> int:
    """The tokens a text encoder reads per prompt, as the latency model charges them."""
    return _TOKENS.get(component.class_name, _T5_TOKENS)


def _encoder_units(component: ComponentInventory, request: Request) -> float:
    return float(component.params * text_tokens(component) * request.batch)


def _text_units(inventory: ModelInventory, request: Request) -> float:
    return sum(_encoder_units(c, request) for c in inventory.text_encoders)


def _cpu_dtype(compute_dtype: str) -> str:
    """The CPU calibration's dtype for a compute dtype: fp16 on a CPU runs as bf16 does."""
    return "fp32" if compute_dtype == "fp32" else "bf16"


def _cpu_text_seconds(
    inventory: ModelInventory, request: Request, cpu: CpuInfo, compute_dtype: str
) -> float:
    """The text encoders' passes on ``cpu`` at ``compute_dtype``, by each encoder's own measured
    figure (profiles/latency.yaml cpu.text_encoder_seconds_per_unit): a text encoder's every
    weight meets every token, so the UNet's per-unit figure does not carry over."""
    calibrated = calibration()["cpu"]["text_encoder_seconds_per_unit"][cpu_kind(cpu)]
    figures = calibrated[_cpu_dtype(compute_dtype)]
    core_seconds = sum(
        _encoder_units(c, request) * figures[_encoder_family(c)] for c in inventory.text_encoders
    )
    return core_seconds / max(cpu.cores, 1)


def _encoder_family(component: ComponentInventory) -> str:
    """The calibration's key for a text encoder: "clip", or "t5" for the rest (T5's long
    sequence is what other encoders are priced like)."""
    return "clip" if component.class_name in _TOKENS else "t5"


def _vae_units(inventory: ModelInventory, request: Request) -> float:
    vae = inventory.vae
    return float(vae.params) * request.width * request.height * request.batch if vae else 0.0


def _format_key(tier: Tier) -> str:
    return f"{tier.backend} {tier.precision}"


# The format whose compiled figure stands in for one without its own (planner.compile always).
_NEAREST_COMPILED = "none bf16"


@dataclass(frozen=True)
class CompileFigure:
    """What compiling a tier's denoiser does: its step against the same format eager, and the
    seconds of a cold compile, measured compiled the way ``scope`` and ``mode`` say (the
    executor compiles it so: execute/compile.py). ``stands_in``: the format whose figure this
    is, when the tier's own format has none (None: its own measurement)."""

    step_factor: float
    seconds: float
    scope: str = "regional"  # compile.SCOPES
    mode: str = "default"  # compile.MODES
    stands_in: str | None = None


def _figure(entry: dict[str, Any], stands_in: str | None = None) -> CompileFigure:
    return CompileFigure(
        float(entry["step_factor"]),
        float(entry["seconds"]),
        str(entry.get("scope", "regional")),
        str(entry.get("mode", "default")),
        stands_in,
    )


def compile_figure(
    inventory: ModelInventory, tier: Tier, *, on_gpu: bool, nearest: bool = False
) -> CompileFigure | None:
    """The calibration's compiled figure for ``tier``'s format (profiles/latency.yaml
    ``compile``); None where there is none, unless ``nearest``: then its kind's unquantized
    figure on a GPU, and on a CPU no speed-up at the CPU's measured compile time."""
    figures = calibration()["compile"]
    if not on_gpu:
        return _figure(figures["cpu"], "cpu") if nearest else None
    table = figures["gpu"][_denoiser_kind(inventory)]
    own = table.get(_format_key(tier))
    if own is not None:
        return _figure(own)
    return _figure(table[_NEAREST_COMPILED], _NEAREST_COMPILED) if nearest else None


def warm_compile_share() -> float:
    """A warm compile's seconds against a cold one's (profiles/latency.yaml compile.warm_share)."""
    return float(calibration()["compile"]["warm_share"])


@dataclass(frozen=True)
class _Gpu:
    """The target card's speed against the reference card's."""

    slowdown: float  # the reference's dense tensor throughput ÷ the target's
    pinned_gb_s: float
    basis: str


def _gpu_speed(profile: HardwareProfile, compute_dtype: str) -> _Gpu:
    figures = calibration()["gpu"]
    reference = find_gpu(figures["reference"])
    transfers = figures["transfers"]
    gpu = profile.primary_gpu
    spec: GpuSpec | None = spec_for(gpu) if gpu is not None else None
    throughput = "bf16_tflops" if compute_dtype == "bf16" else "fp16_tflops"
    own = getattr(spec, throughput) if spec else None
    ours = getattr(reference, throughput)
    if spec is not None and spec.name == reference.name:
        slowdown, basis = 1.0, f"measured on an {reference.aliases[0]}"
    elif own:
        slowdown = ours / own
        basis = (
            f"{reference.aliases[0]} measurements scaled by dense {compute_dtype} throughput "
            f"({ours:g} against {spec.aliases[0] if spec else '?'}'s {own:g} TFLOP/s)"
        )
    else:
        named = spec.aliases[0] if spec and spec.aliases else (gpu.name if gpu else "this GPU")
        slowdown = 1.0
        basis = (
            f"{named}'s throughput is not in profiles/gpus.yaml: times are an "
            f"{reference.aliases[0]}'s (compare plans, not seconds)"
        )
    pinned = float(transfers["pinned_gb_s"])
    gen = spec.pcie_gen if spec else None
    if gen:
        pinned /= 2.0 ** max(int(transfers["pinned_pcie_gen"]) - gen, 0)
    return _Gpu(slowdown, pinned, basis)


def _gpu_latency(
    inventory: ModelInventory,
    tier: Tier,
    request: Request,
    est: Estimate,
    profile: HardwareProfile,
) -> Latency | None:
    figures = calibration()["gpu"]
    kind = _denoiser_kind(inventory)
    factor = figures["format_factors"][kind].get(_format_key(tier))
    if factor is None:
        return None
    speed = _gpu_speed(profile, tier.compute_dtype)
    per_unit = figures["seconds_per_unit"]
    compute = _step_units(inventory, request) * per_unit[kind] * factor * speed.slowdown
    transfers = figures["transfers"]
    denoiser_bytes = est.components[inventory.denoiser.name]
    others = est.weights_bytes - denoiser_bytes
    compute = max(compute, figures["step_floor_seconds"])
    step, swap = compute, 0.0
    if tier.placement == "group_offload":
        step = compute + denoiser_bytes / (transfers["group_offload_gb_s"] * GB)
        swap = others / (transfers["group_offload_gb_s"] * GB)
    elif tier.placement == "group_offload_streams":
        # Each block is copied from pinned memory beside the compute, which barely hides it
        # (profiles/latency.yaml). The text encoders stream leaf by leaf; the VAE streams
        # without CUDA streams (execute/build.py says why).
        copy = denoiser_bytes / (speed.pinned_gb_s * GB)
        step = (compute + copy) * transfers["stream_overhead"][kind]
        vae_bytes = est.components[inventory.vae.name] if inventory.vae else 0
        swap = (others - vae_bytes) / (transfers["leaf_stream_gb_s"] * GB)
        swap += vae_bytes / (transfers["group_offload_gb_s"] * GB)
    elif tier.placement == "model_cpu_offload":
        step = compute * figures["model_offload_step_factor"][kind]
        swap = est.weights_bytes / (transfers["model_offload_gb_s"] * GB)
    if tier.cpu_text_encoders:  # on the host's CPU, at the compute dtype
        text = _cpu_text_seconds(inventory, request, profile.cpu, tier.compute_dtype)
    else:
        text = _text_units(inventory, request) * per_unit["text_encoder"] * speed.slowdown
    vae = _vae_units(inventory, request) * per_unit["vae"] * speed.slowdown
    vae = max(vae, figures["image_floor_seconds"])
    # Streams pin a second host copy of every weight (planner/estimate.py's host_bytes).
    pinned = est.host_bytes // 2 if tier.placement == "group_offload_streams" else 0
    return Latency(
        step_seconds=step,
        steps=request.steps,
        swap_seconds=swap,
        text_seconds=text,
        vae_seconds=vae,
        first_call_seconds=first_call_seconds(inventory, tier, pinned_bytes=pinned),
        basis=speed.basis,
    )


def _cpu_latency(
    inventory: ModelInventory, tier: Tier, request: Request, profile: HardwareProfile
) -> Latency | None:
    figures = calibration()["cpu"]
    dtype = _cpu_dtype(tier.compute_dtype)
    kind = cpu_kind(profile.cpu)
    factor = 1.0
    if tier.backend != UNQUANTIZED:
        factor = figures["format_factors"][dtype].get(_format_key(tier))
        if factor is None:
            return None  # not a CPU format (bitsandbytes is refused there)
    cores = max(profile.cpu.cores, 1)
    per_unit = figures["seconds_per_unit"][kind][dtype] / cores
    vae_per_unit = figures["vae_seconds_per_unit"][kind][dtype] / cores
    where = f"{kind} CPU, {cores} cores"
    return Latency(
        step_seconds=max(
            _step_units(inventory, request) * per_unit * factor, figures["step_floor_seconds"]
        ),
        steps=request.steps,
        swap_seconds=0.0,
        text_seconds=_cpu_text_seconds(inventory, request, profile.cpu, dtype),
        vae_seconds=max(
            _vae_units(inventory, request) * vae_per_unit, figures["image_floor_seconds"]
        ),
        first_call_seconds=first_call_seconds(inventory, tier),
        basis=f"measured on a 2-vCPU {kind} VM and scaled to this {where}",
    )


def first_call_seconds(inventory: ModelInventory, tier: Tier, *, pinned_bytes: int = 0) -> float:
    """Loading one tier the first time: reading the bf16 files, quantizing what the tier
    quantizes, pinning ``pinned_bytes`` of host copies for streams, and GGUF's conversion (cached
    after the first, so later loads pay less than this)."""
    figures = calibration()["gpu"]["first_call"]
    dense_gb = inventory.params * 2 / GB
    seconds = dense_gb / figures["read_gb_s"]
    for part in tier.parts:
        quantized_gb = (
            sum(inventory.component(name).params for name in part.quantized_components) * 2 / GB
        )
        seconds += quantized_gb * figures["quantize_s_per_gb"][part.backend]
    seconds += pinned_bytes / GB / figures["pin_gb_s"]
    if tier.backend == "gguf":  # a user's file (--gguf, K-quants) is not converted
        per_gb = figures["convert_s_per_gb"].get(tier.precision, 0.0)
        seconds += inventory.denoiser.params * 2 / GB * per_gb
    return seconds


def predict(
    inventory: ModelInventory,
    tier: Tier,
    request: Request,
    est: Estimate,
    profile: HardwareProfile,
    *,
    warm: bool = False,
) -> Latency | None:
    """Predicted seconds of ``tier`` on the machine ``profile`` describes; None for a format the
    calibration has no figure for on that kind of device (it is then not ranked by time). A
    compiled tier's step is its eager step times its compiled figure's factor, and its compile
    seconds the figure's, times the warm share when its compile cache is ``warm``."""
    eager = replace(tier, compiled=False)
    if profile.has_gpu:
        latency = _gpu_latency(inventory, eager, request, est, profile)
        floor = calibration()["gpu"]["step_floor_seconds"]
    else:
        latency = _cpu_latency(inventory, eager, request, profile)
        floor = calibration()["cpu"]["step_floor_seconds"]
    if latency is None or not tier.compiled:
        return latency
    figure = compile_figure(inventory, tier, on_gpu=profile.has_gpu, nearest=True)
    assert figure is not None
    basis = latency.basis + (
        f"; compiled at {figure.stands_in}'s figure (none measured for {_format_key(tier)})"
        if figure.stands_in
        else ""
    )
    return replace(
        latency,
        step_seconds=max(latency.step_seconds * figure.step_factor, floor),
        compile_seconds=figure.seconds * (warm_compile_share() if warm else 1.0),
        basis=basis,
    )
