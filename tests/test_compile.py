"""Compiled plans: the Tier flag and its records, how the planner offers and prices compiled
variants (planner.compile, planner.expected_images, warm compile caches, compiled-only fp8), and
the compile cache's files (execute/compile.py), on made-up machines (tests/machines.py)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from machines import made_up_machine

from autoquant.backends import backend_class
from autoquant.backends.tier import Tier
from autoquant.bench import TierSpec
from autoquant.core.errors import ConfigError
from autoquant.core.units import GB
from autoquant.execute.compile import (
    artifact_path,
    compile_denoiser,
    load_artifacts,
    save_artifacts,
    warm_labels,
)
from autoquant.models import inventory, resolve
from autoquant.planner import load_settings, plan
from autoquant.planner.latency import calibration
from autoquant.planner.plan import Plan, PlannedTier
from autoquant.probe.types import HardwareProfile

FLUX = "builtin:flux-dev"


def h200() -> HardwareProfile:
    return made_up_machine(device="cuda", vram=141 * GB, compute_capability="9.0")


def planned(
    machine: HardwareProfile,
    model: str = FLUX,
    *overrides: str,
    warm: frozenset[str] = frozenset(),
) -> Plan:
    return plan(machine, model, load_settings((), list(overrides)), warm_compiles=warm)


def every_tier(p: Plan) -> list[PlannedTier]:
    return [p.chosen, *p.ladder]


def test_a_compiled_tier_says_so_and_old_records_read_as_eager() -> None:
    tier = Tier("none", "bf16", "bf16", (), ("vae_tiling",), compiled=True)
    assert tier.label == "none bf16 (vae tiling, compiled)"
    assert Tier.from_dict(tier.to_dict()) == tier
    old = {k: v for k, v in tier.to_dict().items() if k != "compiled"}
    assert Tier.from_dict(old) == replace(tier, compiled=False)
    spec = TierSpec.of_tier(tier)
    assert spec.compile and spec.name == "none:bf16+vae_tiling+compile"
    assert spec.tier(inventory(resolve("builtin:tiny-sd")), "bf16") == tier


def _break_even(eager: PlannedTier, figure: dict[str, Any], seconds: float) -> float:
    """Images after which a compile of ``seconds`` pays back, from the calibration."""
    assert eager.latency is not None and not eager.tier.compiled
    step = eager.latency.step_seconds
    saved = eager.latency.steps * (step - step * figure["step_factor"])
    return seconds / saved


def test_flux_bf16_compiles_only_when_the_expected_images_pay_the_compile_back() -> None:
    figure = calibration()["compile"]["gpu"]["transformer"]["none bf16"]
    one = planned(h200(), FLUX, "planner.optimize=quality")
    assert not one.chosen.tier.compiled  # 17 s of compile against ~0.8 s saved an image
    assert any(line.startswith("compile auto: ") for line in one.path)
    even = _break_even(one.chosen, figure, figure["seconds"])
    assert 5 < even < 100
    below = planned(
        h200(), FLUX, "planner.optimize=quality", f"planner.expected_images={int(even)}"
    )
    above = planned(
        h200(), FLUX, "planner.optimize=quality", f"planner.expected_images={int(even) + 1}"
    )
    assert not below.chosen.tier.compiled
    assert above.chosen.tier == replace(one.chosen.tier, compiled=True)
    assert above.chosen.latency is not None
    assert above.chosen.latency.compile_seconds == figure["seconds"]
    assert any("compiling ~17 s on its first call (cold)" in line for line in above.path)


def test_a_warm_compile_cache_flips_the_choice() -> None:
    figure = calibration()["compile"]["gpu"]["transformer"]["none bf16"]
    share = calibration()["compile"]["warm_share"]
    eager = planned(h200(), FLUX, "planner.optimize=quality").chosen
    cold_even = _break_even(eager, figure, figure["seconds"])
    images = math.floor(_break_even(eager, figure, figure["seconds"] * share)) + 1
    assert images <= cold_even  # between the warm and the cold break-even
    compiled = replace(eager.tier, compiled=True)
    args = ("planner.optimize=quality", f"planner.expected_images={images}")
    assert not planned(h200(), FLUX, *args).chosen.tier.compiled
    warm = planned(h200(), FLUX, *args, warm=frozenset({compiled.label}))
    assert warm.chosen.tier == compiled
    assert warm.chosen.latency is not None
    assert warm.chosen.latency.compile_seconds == pytest.approx(figure["seconds"] * share)
    assert any("(warm: its compile cache is here)" in line for line in warm.path)


FP8_LADDER = "ladder=[none bf16, torchao float8]"


@pytest.mark.parametrize(
    ("capability", "vram_gb", "fp8_offered"),
    [("8.6", 48, False), ("8.9", 48, True), ("9.0", 141, True), ("9.0", 16, True)],
)
@pytest.mark.parametrize("images", [1, 1000, 1_000_000])
def test_fp8_runs_only_compiled_and_only_from_compute_capability_8_9(
    capability: str, vram_gb: int, fp8_offered: bool, images: int
) -> None:
    machine = made_up_machine(device="cuda", vram=vram_gb * GB, compute_capability=capability)
    p = planned(
        machine, FLUX, FP8_LADDER, "planner.optimize=speed", f"planner.expected_images={images}"
    )
    fp8 = [t for t in every_tier(p) if t.tier.precision == "float8"]
    assert all(t.tier.compiled and t.tier.placement == "resident" for t in fp8)
    if not fp8_offered:
        assert not fp8
        assert any("left out what cannot run here: torchao float8" in line for line in p.path)
    if fp8_offered and images == 1_000_000 and vram_gb > 24:
        assert p.chosen.tier.precision == "float8"  # compiled fp8 is the fastest format there


def test_fp8_is_declared_compiled_only() -> None:
    assert backend_class("torchao").compiled_only == ("float8",)
    assert backend_class("none").compiled_only == ()


def test_never_offers_no_compiled_plan_and_no_compiled_only_format() -> None:
    p = planned(
        h200(), FLUX, FP8_LADDER, "planner.compile=never", "planner.expected_images=1000000"
    )
    assert not any(t.tier.compiled for t in every_tier(p))
    assert not any(t.tier.precision == "float8" for t in every_tier(p))
    assert "compile never: no plan is compiled (compiled-only formats left out)" in p.path


def test_always_compiles_the_chosen_plan_even_where_compile_does_not_pay() -> None:
    p = planned(h200(), "builtin:sdxl", "planner.compile=always", "planner.optimize=quality")
    assert p.chosen.tier.compiled and p.chosen.latency is not None
    assert p.chosen.latency.compile_seconds > 0
    forced = planned(h200(), FLUX, "planner.compile=always", "force.backend=gguf")
    assert forced.chosen.tier.compiled  # no gguf figure: priced at the nearest
    assert forced.chosen.latency is not None
    assert "compiled at none bf16's figure" in forced.chosen.latency.basis


def test_a_forced_fp8_tier_is_compiled_and_warned_about_when_it_cannot_be() -> None:
    fp8 = ("force.backend=torchao", "force.precision=float8")
    assert planned(h200(), FLUX, *fp8).chosen.tier.compiled
    eager = planned(h200(), FLUX, *fp8, "planner.compile=never")
    assert not eager.chosen.tier.compiled
    assert any("pays only compiled" in line for line in eager.path)


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_compiled_plans_are_never_offloaded(mode: str) -> None:
    small = made_up_machine(device="cuda", vram=12 * GB, compute_capability="8.9")
    p = planned(
        small,
        FLUX,
        "ladder=[none bf16, torchao float8, quanto int8, gguf q4_0]",
        f"planner.compile={mode}",
        "planner.expected_images=1000000",
    )
    tiers = every_tier(p)
    assert any(t.tier.offloaded for t in tiers)  # Flux-dev needs offload on 12 GB
    assert all(t.tier.placement == "resident" for t in tiers if t.tier.compiled)


def test_a_cpu_compiles_only_when_asked() -> None:
    cpu = made_up_machine(cpu="bf16")
    auto = planned(cpu, "builtin:tiny-sd", "planner.expected_images=1000000")
    assert not auto.chosen.tier.compiled  # no CPU figure says a compile pays
    always = planned(cpu, "builtin:tiny-sd", "planner.compile=always")
    assert always.chosen.tier.compiled
    assert always.chosen.latency is not None
    assert always.chosen.latency.compile_seconds == calibration()["compile"]["cpu"]["seconds"]


@pytest.mark.parametrize(
    "override", ["planner.expected_images=0", "planner.expected_images=2.5", "planner.compile=on"]
)
def test_the_profile_keys_are_validated(override: str) -> None:
    with pytest.raises(ConfigError):
        load_settings((), [override])


class _Tiny:
    """A module without _repeated_blocks: compiled whole."""

    def __new__(cls) -> Any:
        import torch

        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))


class _Blocks:
    """A denoiser that declares repeated blocks and records how it was compiled regionally."""

    _repeated_blocks = ("Block",)

    def __init__(self) -> None:
        self.regional: list[dict[str, Any]] = []

    def compile_repeated_blocks(self, **kwargs: Any) -> None:
        self.regional.append(kwargs)

    def forward(self, x: Any) -> Any:
        return x


@pytest.mark.parametrize(
    ("scope", "mode", "how", "regional"),
    [
        ("regional", "default", "regional (Block)", [{"fullgraph": True}]),
        (
            "regional",
            "reduce-overhead",
            "regional (Block), reduce-overhead",
            [{"fullgraph": True, "mode": "reduce-overhead"}],
        ),
        ("whole", "default", "whole", []),
        ("whole", "max-autotune", "whole, max-autotune", []),
    ],
)
def test_a_denoiser_is_compiled_in_the_scope_and_mode_asked(
    scope: str, mode: str, how: str, regional: list[dict[str, Any]]
) -> None:
    denoiser = _Blocks()
    assert compile_denoiser(denoiser, scope=scope, mode=mode) == how
    assert denoiser.regional == regional
    # Whole: the instance's forward is replaced by the compiled one.
    assert ("forward" in vars(denoiser)) == (scope == "whole")


def test_an_unknown_scope_or_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="scope"):
        compile_denoiser(_Blocks(), scope="partial", mode="default")
    with pytest.raises(ValueError, match="mode"):
        compile_denoiser(_Blocks(), scope="whole", mode="fast")


def test_every_compiled_figure_names_a_scope_and_mode_the_executor_knows() -> None:
    from autoquant.execute.compile import MODES, SCOPES

    figures = calibration()["compile"]
    entries = [figures["cpu"]] + [e for kind in figures["gpu"].values() for e in kind.values()]
    for entry in entries:
        assert entry.get("scope", "regional") in SCOPES
        assert entry.get("mode", "default") in MODES


def test_the_compile_cache_is_written_atomically_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    module = _Tiny()
    assert compile_denoiser(module, scope="regional", mode="default") == "whole"
    before = module(torch.ones(2, 8))
    folder = tmp_path / "compile" / "key"
    label = "none bf16 (vae tiling, compiled)"
    path = artifact_path(folder, label)
    assert save_artifacts(path)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary file left
    assert warm_labels(folder) == {label}
    assert load_artifacts(path)
    assert torch.equal(module(torch.ones(2, 8)), before)
    assert not load_artifacts(folder / "absent.bin")
    assert warm_labels(tmp_path / "nowhere") == frozenset()

    # A write that fails part-way leaves neither a file nor a temporary one behind.
    def broken() -> tuple[Any, Any]:
        return (object(), None)  # not bytes: the write raises

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", broken)
    other = artifact_path(folder, "gguf q8_0 (compiled)")
    with pytest.raises(TypeError):
        save_artifacts(other)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


def test_freeing_memory_keeps_the_compiled_graphs_only_when_asked() -> None:
    import torch
    from torch._dynamo.utils import counters

    from autoquant.execute import memory

    module = _Tiny()
    compile_denoiser(module, scope="whole", mode="default")
    x = torch.ones(2, 8)
    module(x)
    graphs = counters["stats"]["unique_graphs"]
    memory.free("cpu", keep_compiled=True)  # the same tier runs on: nothing to compile again
    module(x)
    assert counters["stats"]["unique_graphs"] == graphs
    memory.free("cpu")  # a failed tier's graphs go: the next call compiles afresh
    module(x)
    assert counters["stats"]["unique_graphs"] == graphs + 1
