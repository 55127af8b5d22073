"""The planner's decisions, through `autoquant plan --json` and on made-up machines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from machines import made_up_machine

from autoquant.cli.main import main
from autoquant.core.errors import ConfigError
from autoquant.core.units import GB
from autoquant.models import inventory, resolve
from autoquant.planner import load_settings, plan
from autoquant.planner.estimate import Request
from autoquant.planner.rules import default_layer, range_of
from autoquant.probe.types import BackendStatus, CpuInfo, GpuInfo, HardwareProfile


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("args", "backend", "precision"),
    [
        (["--device", "cuda", "--vram", "80GB"], "none", "bf16"),
        (
            ["--device", "cuda", "--vram", "80GB", "--set", "planner.skip_if_fits=false"],
            "quanto",
            "int8",
        ),
        (["--device", "cuda", "--vram", "8GB"], "bitsandbytes", "nf4"),
        (["--device", "cuda", "--vram", "4GB"], "gguf", None),
        (["--device", "cpu"], "gguf", None),
    ],
)
def test_sdxl_decisions_of_the_design_card(
    capsys: pytest.CaptureFixture[str], args: list[str], backend: str, precision: str | None
) -> None:
    data = plan_json(capsys, "--model", "builtin:sdxl", "--optimize", "card", *args)
    assert data["chosen"]["backend"] == backend
    if precision:
        assert data["chosen"]["precision"] == precision
    assert data["request"] == {"width": 1024, "height": 1024, "batch": 1, "steps": 20}
    assert data["path"], "the decision path explains itself"
    required = [tier["estimate_bytes"] for tier in data["ladder"]]
    assert required == sorted(required, reverse=True) and len(set(required)) == len(required)
    assert data["ladder"][0]["backend"] == backend


def test_flux_at_16gb_explains_why_int8_alone_does_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = plan_json(
        capsys,
        "--model",
        "builtin:flux-dev",
        "--optimize",
        "card",
        "--device",
        "cuda",
        "--vram",
        "16GB",
    )
    path = "\n".join(data["path"])
    assert data["chosen"]["backend"] == "quanto"
    assert "quanto int8 as is" in path and "does not fit" in path
    assert "text_encoder_2" in path and "transformer 11.2" in path
    chosen = data["chosen"]
    # What the plan does about it: quantize T5 and/or offload until it fits.
    assert "text_encoder_2" in chosen["components"] or chosen["memory_options"]
    assert chosen["estimate_bytes"] <= data["budget_bytes"]
    assert len(data["ladder"]) >= 2


@pytest.mark.parametrize(
    ("setting", "backend", "precision"),
    [
        ("priorities.deployment=development", "bitsandbytes", "fp4"),
        ("priorities.target=edge", "gguf", "q4_0"),
    ],
)
def test_priorities_pick_the_precision(
    capsys: pytest.CaptureFixture[str], setting: str, backend: str, precision: str
) -> None:
    vram = "8GB" if backend == "bitsandbytes" else "4GB"
    data = plan_json(
        capsys,
        "--model",
        "builtin:sd15",
        "--optimize",
        "card",
        "--device",
        "cuda",
        "--vram",
        vram,
        "--set",
        "planner.skip_if_fits=false",
        "--set",
        setting,
    )
    assert (data["chosen"]["backend"], data["chosen"]["precision"]) == (backend, precision)


def test_quality_first_preset_picks_quanto_mixed(capsys: pytest.CaptureFixture[str]) -> None:
    data = plan_json(
        capsys,
        "--model",
        "builtin:sdxl",
        "--profile",
        "h100-80gb",
        "--optimize",
        "card",
        "--set",
        "planner.skip_if_fits=false",
    )
    assert (data["chosen"]["backend"], data["chosen"]["precision"]) == ("quanto", "mixed")
    assert "tree 'large card': vram_gb 80 >= 12 → quanto" in data["path"]


def test_cli_flags_win_over_presets(capsys: pytest.CaptureFixture[str]) -> None:
    data = plan_json(
        capsys, "--model", "builtin:sdxl", "--profile", "rtx4060-8gb", "--vram", "80GB"
    )
    assert data["chosen"]["backend"] == "none"


def test_user_file_overrides_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text("force:\n  backend: gguf\n  precision: q8_0\n")
    data = plan_json(
        capsys, "--model", "builtin:sdxl", "--profile", "rtx4060-8gb", "--profile", str(user)
    )
    assert (data["chosen"]["backend"], data["chosen"]["precision"]) == ("gguf", "q8_0")
    assert data["path"][1].startswith("forced")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("planner:\n  headroom: [0.8\n", "malformed YAML"),
        ("planner:\n  skip_if_fit: false\n", "did you mean 'planner.skip_if_fits'"),
        ("priorities:\n  quality: best\n", "choose one of balanced, quality_first"),
        ("planner:\n  headroom: lots\n", "must be int or float"),
        ("ladder:\n  - gguf q3_k\n", "unknown precision 'q3_k'"),
        ("force:\n  backend: nosuch\n", "unknown backend 'nosuch'"),
        ("thresholds:\n  bitsandbytes_min_vram_gb: 16\n", "thresholds out of order"),
    ],
)
def test_bad_profiles_give_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    assert main(["plan", "--model", "builtin:tiny-sd", "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert str(bad) in err


def test_unknown_set_key_gives_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--set", "planner.no_such=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'planner.no_such'" in err


def test_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("# comment\nplanner:\n  headroom: 0.8\n  skip_if_fitz: true\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: unknown key 'planner.skip_if_fitz'"):
        load_settings([str(bad)])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("planner:\n  headroom: -1\n", "'planner.headroom' is -1; it must be a number greater"),
        ("planner:\n  headroom: 0\n", "a number greater than 0 and at most 1"),
        ("planner:\n  headroom: 1.01\n", "a number greater than 0 and at most 1"),
        ("planner:\n  ladder_length: 0\n", "a whole number from 1 to 100"),
        ("planner:\n  ladder_length: 2.5\n", "'planner.ladder_length' must be int, not float"),
        ("thresholds:\n  quanto_min_vram_gb: -4\n", "a number from 0 to 100000"),
        ("request:\n  width: 1001\n", "'request.width' is 1001; it must be a multiple of 8"),
        ("request:\n  height: 0\n", "a multiple of 8 from 8 to 8192"),
        ("request:\n  batch: 0\n", "a whole number from 1 to 1024"),
        ("request:\n  steps: 1001\n", "a whole number from 1 to 1000"),
        ("hardware:\n  vram: lots\n", "'hardware.vram': cannot read size 'lots'"),
    ],
)
def test_numeric_settings_out_of_range_name_file_and_line(
    tmp_path: Path, content: str, expected: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_settings([str(bad)])
    message = str(error.value)
    assert message.startswith(f"{bad}:2: ") and expected in message and "\n" not in message


def test_numeric_settings_at_their_edges_load() -> None:
    edges = [
        "planner.headroom=1",
        "planner.ladder_length=1",
        "thresholds.bitsandbytes_min_vram_gb=0",
        "request.width=8",
        "request.height=8192",
        "request.steps=1000",
        "hardware.vram=6GB",
    ]
    settings = load_settings([], edges)
    assert settings["planner"]["headroom"] == 1 and settings["request"]["height"] == 8192


def test_every_numeric_setting_of_the_default_profile_has_a_range() -> None:
    def leaves(data: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
        for key, value in data.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    numeric = [
        key
        for key, value in leaves(default_layer().data)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    assert "planner.headroom" in numeric and "thresholds.quanto_min_vram_gb" in numeric
    assert [key for key in numeric if range_of(key) is None] == []


def _gpu_profile(*gpus: GpuInfo, ram: int = 64 * 1024**3) -> HardwareProfile:
    backends = {
        name: BackendStatus(True, "1.0", True)
        for name in ("bitsandbytes", "optimum-quanto", "torchao", "gguf", "diffusers")
    }
    return HardwareProfile(
        accelerator="cuda",
        gpus=gpus,
        driver="580",
        ram_total_bytes=ram,
        ram_available_bytes=ram,
        cpu=CpuInfo("test", 8),
        disk_free_bytes=10**12,
        backends=backends,
    )


def test_two_small_gpus_spread_the_pipeline() -> None:
    gpus = (
        GpuInfo("A", 16 * 10**9, 16 * 10**9, "8.9", 0),
        GpuInfo("B", 16 * 10**9, 16 * 10**9, "8.9", 1),
    )
    settings = load_settings([], ["planner.optimize=card", "planner.skip_if_fits=false"])
    result = plan(_gpu_profile(*gpus), "builtin:flux-dev", settings)
    assert result.chosen.device_map == "balanced"
    assert "spread over 2 GPUs" in "\n".join(result.path)


def test_unusable_backend_is_passed_over_with_its_reason() -> None:
    profile = _gpu_profile(GpuInfo("small", 8 * 10**9, 8 * 10**9, "8.6"))
    backends = dict(profile.backends)
    backends["bitsandbytes"] = BackendStatus(False, None, False, "not installed: pip install x")
    profile = HardwareProfile(**{**profile.__dict__, "backends": backends})
    settings = load_settings([], ["planner.optimize=card", "planner.skip_if_fits=false"])
    result = plan(profile, "builtin:sdxl", settings)
    assert result.chosen.tier.backend == "gguf"
    assert any("cannot run here: not installed" in line for line in result.path)


def test_impossible_budget_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "builtin:flux-dev", "--device", "cuda", "--vram", "1GB"]) == 2
    err = capsys.readouterr().err
    assert "no tier of builtin:flux-dev fits" in err and err.count("\n") == 1


@pytest.mark.parametrize(("cpu", "dtype"), [("bf16", "bf16"), ("no-bf16", "fp32")])
def test_cpu_compute_dtype_follows_bf16_units(cpu: str, dtype: str) -> None:
    host = made_up_machine(cpu=cpu)
    settings = load_settings()
    result = plan(host, "builtin:tiny-sd", settings)
    assert result.chosen.tier.compute_dtype == dtype


@pytest.mark.parametrize(
    ("machine", "dtype"),
    [
        # A CPU without bf16 units where the tree's GGUF does not fit: the fallback took
        # "none bf16" (3.6 GiB) at bf16 compute; at fp32 it needs 6.2 GiB, and quanto int8 fits.
        (made_up_machine(cpu="no-bf16", ram_gib=7.6), "fp32"),
        # A T4-class card (no bf16): fp16.
        (made_up_machine(device="cuda", vram=6 * GB, compute_capability="7.5"), "fp16"),
    ],
)
def test_the_cards_ladder_computes_unquantized_tiers_at_the_devices_dtype(
    machine: HardwareProfile, dtype: str
) -> None:
    # The profile's ladder names "none bf16"; where the device has no bf16 it would run
    # emulated. The card's fallback and ladder take it at the compute dtype, as the timed plans.
    settings = load_settings([], ["planner.optimize=card"])
    inv = inventory(resolve("builtin:sd15"))
    ladder = plan(machine, inv, settings, Request(512, 512, 1, 20)).ladder
    assert all(p.tier.compute_dtype == dtype for p in ladder), [p.label for p in ladder]
    assert all(p.tier.precision == dtype for p in ladder if p.tier.backend == "none")


@pytest.mark.parametrize("vram", ["4GB", "6GB", "8GB", "12GB", "16GB", "24GB"])
@pytest.mark.parametrize("model", ["builtin:sdxl", "builtin:flux-dev"])
def test_bitsandbytes_is_never_paired_with_group_offload(
    capsys: pytest.CaptureFixture[str], model: str, vram: str
) -> None:
    # NF4 + group offload crashed in its first generation (Flux-dev, H200): CUBLAS internal error.
    data = plan_json(capsys, "--model", model, "--device", "cuda", "--vram", vram)
    for tier in data["ladder"]:
        assert not (tier["backend"] == "bitsandbytes" and "group_offload" in tier["memory_options"])


def test_the_card_falls_down_the_ladder_to_model_offload_before_group_offload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Flux-dev at 12 GB: quanto int8 does not fit even offloaded; torchao int8 would fit only
    # with group offload, gguf q5_1 with model offload: take that.
    card = ("--model", "builtin:flux-dev", "--optimize", "card", "--device", "cuda")
    data = plan_json(capsys, *card, "--vram", "12GB")
    chosen = data["chosen"]
    assert (chosen["backend"], chosen["precision"]) == ("gguf", "q5_1")
    assert "model_cpu_offload" in chosen["memory_options"]
    # Below that only group offload is left, and the plan still finds it.
    data = plan_json(capsys, *card, "--vram", "6GB")
    # Streamed from pinned memory where this host's RAM holds a second copy, else from pageable.
    assert {"group_offload_streams", "group_offload"} & set(data["chosen"]["memory_options"])
    assert data["chosen"]["backend"] == "torchao"


def test_bitsandbytes_offloaded_loads_one_quantized_component_on_the_gpu_at_a_time() -> None:
    from autoquant.backends.tier import Tier
    from autoquant.models import inventory, resolve
    from autoquant.planner.estimate import Request, estimate

    inv = inventory(resolve("builtin:flux-dev"))
    quantized = ("transformer", "text_encoder", "text_encoder_2")
    request = Request(1024, 1024)
    for backend, precision in (("bitsandbytes", "nf4"), ("torchao", "int8")):
        tier = Tier(backend, precision, "bf16", quantized, ("model_cpu_offload",))
        est = estimate(inv, tier, request, on_gpu=True)
        largest = max(est.components[name] for name in quantized)
        # bitsandbytes quantizes while loading onto the GPU, one component at a time
        # (backends/base.py): the largest is the load peak, not their sum; torchao quantizes
        # where it loads, on the CPU: no load peak beyond the generation's.
        if backend == "bitsandbytes":
            assert est.load_peak_bytes == max(est.peak_bytes, largest)
        else:
            assert est.load_peak_bytes == est.peak_bytes
        assert est.load_peak_bytes < sum(est.components[name] for name in quantized)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float16", "fp16"), ("bf16", "bf16"), ("float32", "fp32"), ("auto", "bf16")],
)
def test_dtype_takes_diffusers_cli_names(
    capsys: pytest.CaptureFixture[str], name: str, dtype: str
) -> None:
    data = plan_json(capsys, "--model", "builtin:sdxl", "--gpu", "H200", "--dtype", name)
    assert data["settings"]["planner"]["compute_dtype"] == ("auto" if name == "auto" else dtype)
    assert data["chosen"]["compute_dtype"] == dtype  # the H200 has bf16 units: auto is bf16
    assert all(tier["compute_dtype"] == dtype for tier in data["ladder"])


def test_an_unknown_dtype_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--dtype", "int4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'int4'" in err and err.count("\n") == 1


def test_mixed_plans_give_the_text_encoders_another_backends_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autoquant.backends import backend_class
    from autoquant.core.units import GB
    from autoquant.models import inventory, resolve
    from autoquant.planner.estimate import Request

    inv = inventory(resolve("builtin:sdxl"))
    request = Request(1024, 1024, steps=20)
    card = made_up_machine(device="cuda", vram=10 * GB, compute_capability="9.0")
    # Declared pairs only: none pairs with torchao (a CPU run), not (yet) with bitsandbytes.
    monkeypatch.setattr(backend_class("none"), "encoder_backends", ("torchao",))
    ladder = plan(card, inv, load_settings(), request).ladder
    mixed = [p for p in ladder if p.tier.encoders is not None and p.tier.backend == "none"]
    assert mixed and {p.tier.encoders.name for p in mixed} == {"torchao:int8"}
    bf16 = ladder[0]
    assert bf16.tier.backend == "none" and bf16.tier.encoders is None
    # Same denoiser, same speed, less memory: the first fallback keeps the bf16 UNet, and its
    # class is the worst of its parts' (int8 text encoders).
    fallback = ladder[1]
    assert (fallback.tier.backend, fallback.tier.encoders) == ("none", mixed[0].tier.encoders)
    assert fallback.seconds == pytest.approx(bf16.seconds, rel=0.05)
    assert fallback.estimate.required_bytes < bf16.estimate.required_bytes
    assert fallback.fidelity == "int8"
    for encoder in inv.text_encoders:  # int8 Linear weights: one byte each, not bf16's two
        assert fallback.parts[encoder.name]["format"] == "torchao int8"
        saved = bf16.estimate.components[encoder.name] - fallback.estimate.components[encoder.name]
        assert saved == pytest.approx(encoder.linear_params * 1.01, rel=0.01)
    # Off with the text encoders' policy, or with the formats list emptied.
    for override in (
        "components.quantize_text_encoders=never",
        "components.text_encoder_formats=[]",
    ):
        quiet = plan(card, inv, load_settings([], [override]), request).ladder
        assert all(p.tier.encoders is None for p in quiet)


def test_a_forced_mixed_tier_and_its_bad_spellings() -> None:
    from autoquant.core.units import GB
    from autoquant.models import inventory, resolve

    inv = inventory(resolve("builtin:flux-dev"))
    card = made_up_machine(device="cuda", vram=24 * GB, compute_capability="9.0")
    # quanto declares no pairing: forced anyway, with a warning.
    forced = [
        "force.backend=quanto",
        "force.precision=int8",
        "force.text_encoders=bitsandbytes nf4",
    ]
    the_plan = plan(card, inv, load_settings([], forced))
    tier = the_plan.chosen.tier
    assert tier.label.startswith("quanto int8 (text encoders bitsandbytes nf4")
    assert tier.quantized_components == ("transformer",)
    assert tier.encoders is not None and tier.encoders.components == (
        "text_encoder",
        "text_encoder_2",
    )
    assert any("does not declare text encoders of bitsandbytes" in step for step in the_plan.path)
    for bad, said in [
        (["force.text_encoders=bitsandbytes nf4"], "needs force.backend"),
        ([*forced[:2], "force.text_encoders=gguf q8_0"], "gguf does not quantize text encoders"),
        ([*forced[:2], "force.text_encoders=torchao"], "'backend precision'"),
        (["components.text_encoder_formats=[none bf16]"], "none does not quantize text encoders"),
    ]:
        with pytest.raises(ConfigError, match=said):
            load_settings([], bad)


@pytest.mark.parametrize(
    ("flags", "placements", "others"),
    [
        (["--cpu-offload", "model", "--vae-tiling"], {"model_cpu_offload"}, {"vae_tiling"}),
        (
            ["--cpu-offload", "group", "--vae-slicing"],
            {"group_offload_streams", "group_offload"},
            {"vae_slicing"},
        ),
        (["--vae-tiling", "--vae-slicing"], None, {"vae_tiling", "vae_slicing"}),
    ],
)
def test_diffusers_cli_memory_flags_are_parts_every_plan_has(
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    placements: set[str] | None,
    others: set[str],
) -> None:
    data = plan_json(capsys, "-m", "builtin:sdxl", "--gpu", "RTX 4060", *flags)
    assert any(step.startswith("required: ") for step in data["path"])
    backends = set()
    for entry in data["ladder"]:  # the planner still chose backend, precision, text encoders
        assert others <= set(entry["memory_options"])
        placement = next((o for o in entry["memory_options"] if "offload" in o), "resident")
        assert placements is None or placement in placements
        backends.add(entry["backend"])
    assert len(backends) > 1


def test_cpu_offload_on_a_cpu_plan_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-m", "builtin:tiny-sd", "--device", "cpu", "--cpu-offload", "model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "this plan is for the CPU" in err


def test_a_mixed_plan_is_placed_only_where_every_backend_of_it_survives() -> None:
    """bitsandbytes does not survive group offload: NF4 text encoders never stream, whoever
    quantizes the denoiser."""
    from autoquant.core.units import GB
    from autoquant.models import inventory, resolve
    from autoquant.planner.estimate import Request

    inv = inventory(resolve("builtin:flux-dev"))
    every = load_settings([], ["planner.ladder_length=100"])
    streamed = []
    for vram, ram in ((141, 24), (6, 24), (6, 256)):
        card = made_up_machine(device="cuda", vram=vram * GB, compute_capability="9.0", ram_gib=ram)
        ladder = plan(card, inv, every, Request(1024, 1024, steps=20)).ladder
        streamed += [p for p in ladder if p.tier.streamed]
    assert streamed
    for planned in streamed:
        assert all(part.backend != "bitsandbytes" for part in planned.tier.parts), planned.label
