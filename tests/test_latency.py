"""The latency model, the fidelity classes and the choice among plans that fit, on made-up
machines (tests/machines.py and cards built here): no test depends on this host's CPU or GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from machines import INSTALLED, made_up_machine

from autoquant.backends import backend_classes
from autoquant.backends.tier import Tier
from autoquant.cli.main import main
from autoquant.core.units import GB, GiB
from autoquant.models import inventory, resolve
from autoquant.models.types import ModelInventory
from autoquant.planner import load_settings, plan
from autoquant.planner.estimate import Request, estimate
from autoquant.planner.fidelity import fidelity_class
from autoquant.planner.latency import calibration, cpu_kind, predict
from autoquant.planner.plan import Plan
from autoquant.probe.backends import assess_backends
from autoquant.probe.types import CpuInfo, GpuInfo, HardwareProfile

REPO = Path(__file__).resolve().parents[1]


def _inv(model: str) -> ModelInventory:
    return inventory(resolve(model))


def card(
    vram_gb: float, name: str = "NVIDIA H200", *, ram_gib: float = 128, cc: str = "9.0"
) -> HardwareProfile:
    """A machine with one card named ``name`` and ``vram_gb`` of it free (as `--vram-limit`
    leaves an H200), every backend installed."""
    memory = int(vram_gb * GB)
    return HardwareProfile(
        accelerator="cuda",
        gpus=(GpuInfo(name, memory, memory, cc),),
        driver="580",
        ram_total_bytes=int(ram_gib * GiB),
        ram_available_bytes=int(ram_gib * GiB),
        cpu=CpuInfo("made-up host", 16, ("avx2",)),
        disk_free_bytes=10**12,
        backends=assess_backends("cuda", INSTALLED),
    )


def _plan(profile: HardwareProfile, model: str, objective: str, *extra: str) -> Plan:
    inv = _inv(model)
    settings = load_settings([], [f"planner.optimize={objective}", *extra])
    return plan(profile, inv, settings, Request(inv.default_size, inv.default_size, 1, 20))


def _label(p: Plan) -> tuple[str, str, tuple[str, ...]]:
    tier = p.chosen.tier
    return tier.backend, tier.precision, tier.memory_options


# --- the calibration covers what the registry offers, and reproduces its sources -------------


def test_every_precision_of_every_backend_is_priced_on_a_gpu() -> None:
    factors = calibration()["gpu"]["format_factors"]
    for backend in backend_classes():
        for precision in backend.precisions:
            for kind in ("unet", "transformer"):
                assert f"{backend.name} {precision}" in factors[kind], (backend.name, precision)


def test_every_quantized_precision_that_runs_on_a_cpu_is_priced_there() -> None:
    factors = calibration()["cpu"]["format_factors"]
    for backend in backend_classes():
        if "cpu" not in backend.runs_on or not backend.quantizes:
            continue
        for precision in set(backend.precisions) - set(backend.fp8_precisions):  # GPU-only
            for dtype in ("bf16", "fp32"):
                assert f"{backend.name} {precision}" in factors[dtype], (backend.name, precision)


@pytest.mark.parametrize(
    ("model", "step_seconds"),
    [
        # docs/runs/2026-12-01-h200/sdxl-10GB.json: `autoquant run`'s own SDXL bf16 step.
        ("builtin:sdxl", 0.0609),
        # docs/benchmarks.md: the Flux-dev transformer's bf16 forward on an H200.
        ("builtin:flux-dev", 0.1731),
    ],
)
def test_the_gpu_figures_reproduce_their_measurements(model: str, step_seconds: float) -> None:
    inv = _inv(model)
    tier = Tier("none", "bf16", "bf16")
    request = Request(1024, 1024, 1, 20)
    profile = card(141)
    latency = predict(inv, tier, request, estimate(inv, tier, request, on_gpu=True), profile)
    assert latency is not None
    assert latency.step_seconds == pytest.approx(step_seconds, rel=0.01)
    assert latency.basis == "measured on an H200"


@pytest.mark.parametrize(
    ("flags", "dtype", "step_seconds", "generation_seconds"),
    [
        # docs/runs/cpu-choice/: SD1.5 at 512², 3 steps, bf16, a 2-vCPU Xeon with AMX.
        (("avx512f", "avx512_bf16", "amx_bf16"), "bf16", 4.98, None),
        # docs/runs/cpu-choice-avx512/: the same on a 2-vCPU AMD EPYC with avx512_bf16, forced
        # none bf16 and none fp32 (medians of 2 rounds).
        (("avx512f", "avx512_bf16"), "bf16", 3.512, 18.17),
        (("avx512f", "avx512_bf16"), "fp32", 7.034, 38.44),
        # docs/runs/cpu-choice-avx2/: the same on a 2-vCPU AMD EPYC with AVX2 only, none fp32.
        (("avx2", "fma"), "fp32", 13.393, 75.95),
    ],
)
def test_the_cpu_figures_reproduce_their_measurements(
    flags: tuple[str, ...], dtype: str, step_seconds: float, generation_seconds: float | None
) -> None:
    inv = _inv("builtin:sd15")
    host = made_up_machine(cpu="bf16")
    two_cores = HardwareProfile(**{**host.__dict__, "cpu": CpuInfo("x", 2, flags)})
    tier = Tier("none", dtype, dtype)
    request = Request(512, 512, 1, 3)
    latency = predict(inv, tier, request, estimate(inv, tier, request, on_gpu=False), two_cores)
    assert latency is not None
    assert latency.step_seconds == pytest.approx(step_seconds, rel=0.01)
    if generation_seconds is not None:
        assert latency.seconds == pytest.approx(generation_seconds, rel=0.01)


def _latency_check() -> ModuleType:
    path = REPO / "scripts/latency_check.py"
    spec = importlib.util.spec_from_file_location("latency_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("run", "kind", "entry", "seconds"),
    [
        ("cpu-choice", "amx", "none:bf16", 31.84),
        ("cpu-choice-avx512", "avx512", "none:bf16", 18.17),
        ("cpu-choice-avx2", "avx2", "none:fp32", 75.95),
    ],
)
def test_latency_check_prices_a_cpu_run_on_the_machine_it_recorded(
    run: str, kind: str, entry: str, seconds: float
) -> None:
    # scripts/latency_check.py once priced committed CPU runs on the machine it ran on: an AVX2
    # host priced the avx512 EPYC's runs at avx2's figures. The host facts the run recorded
    # decide now, whatever this machine is.
    check = _latency_check()
    path = REPO / "docs/runs" / run / "cpu-choice.json"
    result = json.loads(path.read_text())
    assert cpu_kind(check._cpu_choice_host(result["host"]).cpu) == kind
    rows = {row["run"]: row for row in check._from_cpu_choice(path, result, {})}
    assert rows[f"{run}/{entry}"]["predicted_s"] == pytest.approx(seconds, rel=0.01)


@pytest.mark.parametrize(
    ("run", "flags"),
    [("cpu-text-encoder", ("avx2",)), ("cpu-text-encoder-avx512", ("avx512f", "avx512_bf16"))],
)
def test_the_cpu_text_encoder_figures_reproduce_their_runs(
    run: str, flags: tuple[str, ...]
) -> None:
    # docs/runs/<run>/ (scripts/cpu_text_encoder.py): Flux-dev's CLIP-L and T5-XXL, one prompt
    # per dtype, extrapolated to the full encoder, on 2 vCPU with 2 torch threads.
    measured = json.loads((REPO / "docs/runs" / run / "cpu-text-encoder.json").read_text())
    assert measured["host"]["torch_threads"] == 2
    inv = _inv("builtin:flux-dev")
    host = made_up_machine(cpu="bf16")
    two_cores = HardwareProfile(**{**host.__dict__, "cpu": CpuInfo("x", 2, flags)})
    request = Request(1024, 1024, 1, 20)
    for dtype in ("bf16", "fp32"):
        tier = Tier("none", dtype, dtype)
        est = estimate(inv, tier, request, on_gpu=False)
        latency = predict(inv, tier, request, est, two_cores)
        assert latency is not None
        full = sum(row["full_seconds"] for row in measured["rows"] if row["dtype"] == dtype)
        assert latency.text_seconds == pytest.approx(full, rel=0.01)


@pytest.mark.parametrize(
    ("flags", "kind"),
    [
        (("avx2", "avx512f", "avx512_bf16", "amx_bf16"), "amx"),
        (("avx2", "avx512f", "avx512_bf16"), "avx512"),
        (("avx2", "fma"), "avx2"),
        ((), "avx2"),
    ],
)
def test_cpu_kind_reads_the_flags(flags: tuple[str, ...], kind: str) -> None:
    assert cpu_kind(CpuInfo("x", 2, flags)) == kind


def test_another_card_is_scaled_by_its_throughput_and_an_unknown_one_says_so() -> None:
    inv = _inv("builtin:flux-dev")
    tier = Tier("none", "bf16", "bf16")
    request = Request(1024, 1024, 1, 20)
    est = estimate(inv, tier, request, on_gpu=True)
    h200 = predict(inv, tier, request, est, card(141))
    rtx = predict(inv, tier, request, est, card(24, "NVIDIA GeForce RTX 4090", cc="8.9"))
    unknown = predict(inv, tier, request, est, card(24, "Made-up GPU"))
    assert h200 and rtx and unknown
    assert rtx.step_seconds > 3 * h200.step_seconds and "scaled by dense bf16" in rtx.basis
    assert (
        unknown.step_seconds == h200.step_seconds and "not in profiles/gpus.yaml" in unknown.basis
    )


def test_streaming_costs_the_copy_and_model_offload_the_swaps() -> None:
    inv = _inv("builtin:flux-dev")
    request = Request(1024, 1024, 1, 20)
    profile = card(141)
    resident = Tier("none", "bf16", "bf16")
    times = {}
    for tier in (
        resident,
        resident.with_options("model_cpu_offload"),
        resident.with_options("group_offload_streams"),
        resident.with_options("group_offload"),
    ):
        latency = predict(inv, tier, request, estimate(inv, tier, request, on_gpu=True), profile)
        assert latency is not None
        times[tier.placement] = latency
    assert times["model_cpu_offload"].step_seconds == times["resident"].step_seconds
    assert times["model_cpu_offload"].swap_seconds > 10  # 34 GB at 1.5 GB/s, once
    # Pinned and overlapped: each step pays the 24 GB copy at ~55 GB/s; pageable: at ~1.5 GB/s.
    assert 0.5 < times["group_offload_streams"].step_seconds < 0.7
    assert times["group_offload"].step_seconds > 10 * times["group_offload_streams"].step_seconds


# --- fidelity classes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "precision", "fidelity"),
    [
        ("none", "bf16", "bf16"),
        ("none", "fp32", "bf16"),
        ("torchao", "int8", "int8"),
        ("quanto", "int8", "int8"),
        ("gguf", "q8_0", "int8"),
        ("bitsandbytes", "int8", "int8"),
        ("gguf", "q5_1", "4bit"),
        ("bitsandbytes", "nf4", "4bit"),
        ("quanto", "int4", "4bit"),
        ("torchao", "float8", "4bit"),  # eager dynamic fp8 measured at 3.7e-2
    ],
)
def test_fidelity_classes_follow_the_measured_layer_error(
    backend: str, precision: str, fidelity: str
) -> None:
    assert fidelity_class(Tier(backend, precision, "bf16")) == fidelity


# --- the choice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "vram", "objective", "expected"),
    [
        # Flux-dev under 10 GB (measured on an H200, docs/runs/2026-12-01-h200-speed/): bf16
        # streamed 11.8 s, torchao int8 streamed 10.0 s. balanced takes the better class.
        ("builtin:flux-dev", 10, "balanced", ("none", "bf16", "group_offload_streams")),
        ("builtin:flux-dev", 10, "quality", ("none", "bf16", "group_offload_streams")),
        ("builtin:flux-dev", 10, "speed", ("torchao", "int8", "group_offload_streams")),
        # 16 GB: NF4 with T5 NF4 resident (4.4 s) is over twice as fast as anything better.
        ("builtin:flux-dev", 16, "balanced", ("bitsandbytes", "nf4", "resident")),
        ("builtin:flux-dev", 16, "quality", ("none", "bf16", "group_offload_streams")),
        # 24 GB: torchao int8 resident (5.0 s) is within 1.5x of NF4 (4.4 s).
        ("builtin:flux-dev", 24, "balanced", ("torchao", "int8", "resident")),
        ("builtin:flux-dev", 80, "balanced", ("none", "bf16", "resident")),
        ("builtin:sdxl", 4, "balanced", ("bitsandbytes", "nf4", "model_cpu_offload")),
        ("builtin:sdxl", 12, "balanced", ("none", "bf16", "resident")),
    ],
)
def test_the_objective_chooses_among_plans_that_fit(
    model: str, vram: float, objective: str, expected: tuple[str, str, str]
) -> None:
    result = _plan(card(vram), model, objective)
    tier = result.chosen.tier
    assert (tier.backend, tier.precision, tier.placement) == expected
    assert result.chosen.fits
    assert any(line.startswith(f"objective {objective}:") for line in result.path)
    assert any(line.startswith("runner-up:") for line in result.path)


def test_speed_is_the_fastest_plan_that_fits_and_quality_the_fastest_of_the_best_class() -> None:
    profile = card(10)
    speed = _plan(profile, "builtin:flux-dev", "speed")
    quality = _plan(profile, "builtin:flux-dev", "quality")
    # Every plan the ladder offers is slower than speed's choice, and none beats quality's
    # choice within its class.
    for entry in speed.ladder[1:]:
        assert entry.seconds >= speed.chosen.seconds
    for entry in quality.ladder[1:]:
        assert entry.fidelity != quality.chosen.fidelity or entry.seconds >= quality.chosen.seconds


def test_balanced_slowdown_spans_speed_to_quality() -> None:
    profile = card(10)
    fastest = _label(_plan(profile, "builtin:flux-dev", "speed"))
    best = _label(_plan(profile, "builtin:flux-dev", "quality"))
    assert fastest != best
    tight = _plan(profile, "builtin:flux-dev", "balanced", "planner.balanced_slowdown=1")
    loose = _plan(profile, "builtin:flux-dev", "balanced", "planner.balanced_slowdown=100")
    assert _label(tight) == fastest and _label(loose) == best


def test_streams_need_host_memory_for_their_pinned_copies() -> None:
    # Flux-dev bf16 streamed pins a second copy of its 34 GB: 48 GB of RAM cannot hold it.
    roomy = _plan(card(10, ram_gib=128), "builtin:flux-dev", "quality")
    short = _plan(card(10, ram_gib=48), "builtin:flux-dev", "quality")
    assert _label(roomy) == ("none", "bf16", ("vae_slicing", "vae_tiling", "group_offload_streams"))
    # Short of RAM, bf16 still streams, from pageable memory (one host copy): slower, same class.
    assert _label(short) == ("none", "bf16", ("vae_slicing", "vae_tiling", "group_offload"))
    assert short.chosen.estimate.host_bytes <= 48 * GiB < roomy.chosen.estimate.host_bytes


def test_the_ladder_is_the_next_fastest_plan_that_needs_less_memory() -> None:
    result = _plan(card(10), "builtin:flux-dev", "balanced")
    needs = [p.estimate.required_bytes for p in result.ladder]
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == len(needs)
    # Each fallback is the fastest plan needing less than the one before it, so the later one
    # was a candidate too when the earlier one was picked: past the choice, time never falls.
    fallbacks = [p.seconds for p in result.ladder[1:]]
    assert len(fallbacks) >= 2 and fallbacks == sorted(fallbacks)


@pytest.mark.parametrize(
    ("cpu", "ram_gib", "expected"),
    [
        # Unquantized at the CPU's best compute dtype when it fits RAM.
        ("bf16", 64, ("none", "bf16")),
        ("no-bf16", 64, ("none", "fp32")),
    ],
)
def test_a_cpu_runs_unquantized_at_its_best_dtype_when_it_fits(
    cpu: str, ram_gib: float, expected: tuple[str, str]
) -> None:
    result = _plan(made_up_machine(cpu=cpu, ram_gib=ram_gib), "builtin:sd15", "balanced")
    assert (result.chosen.tier.backend, result.chosen.tier.precision) == expected


@pytest.mark.parametrize("cpu", ["bf16", "no-bf16"])
def test_a_cpu_short_of_ram_quantizes_and_says_how_long_it_will_take(cpu: str) -> None:
    inv = _inv("builtin:sdxl")
    # 0.75 of 12 GiB available, 0.9 of that the budget: unquantized SDXL (8.4 GB in bf16,
    # 16 in fp32) does not fit; int8-class weights do.
    result = _plan(made_up_machine(cpu=cpu, ram_gib=12), "builtin:sdxl", "balanced")
    tier = result.chosen.tier
    assert tier.backend != "none" or tier.encoders is not None  # the denoiser, or beside it
    assert result.chosen.fits and result.chosen.latency is not None
    unquantized = estimate(inv, Tier("none", "fp32", "fp32"), Request(1024, 1024), on_gpu=False)
    assert unquantized.required_bytes > result.budget_bytes


def test_card_follows_the_design_card_tree() -> None:
    result = _plan(card(16), "builtin:flux-dev", "card")
    assert result.chosen.tier.backend == "quanto"
    assert any(line.startswith("tree 'large card'") for line in result.path)


# --- the CLI ---------------------------------------------------------------------------------


def test_plan_shows_seconds_fidelity_and_objective(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", "builtin:flux-dev", "--gpu", "H200", "--steps", "20"]
    assert main([*args, "--optimize", "speed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["planner"]["optimize"] == "speed"
    for entry in data["ladder"]:
        assert entry["latency"]["steps"] == 20 and entry["fidelity"] in ("bf16", "int8", "4bit")
        assert set(entry["parts"]) == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "seconds predicted for one generation of 20 steps at 1024x1024" in out
    assert " s, bf16 class, needs" in out


def test_an_unknown_objective_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--optimize", "fastest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fastest'" in err and err.count("\n") == 1


def test_the_profile_key_is_validated(tmp_path: Path) -> None:
    from autoquant.core.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("planner:\n  optimize: fastest\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: 'planner.optimize' is 'fastest'"):
        load_settings([str(bad)])
