"""The first-block cache (planner.cache, `--cache first-block`): which denoisers take it, how
the planner puts it on every plan and refuses what cannot work, its Tier and bench spec, and
that it really skips steps on builtin:tiny-flux (counted by the bench's full_forwards)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import diffusers
import numpy as np
import pytest
from diffusers.models.cache_utils import CacheMixin
from machines import made_up_machine

from autoquant.backends.tier import Tier
from autoquant.bench import TierSpec
from autoquant.bench.tier_run import full_forwards
from autoquant.core.errors import AutoquantError
from autoquant.core.units import GB
from autoquant.models import inventory, resolve
from autoquant.models.step_cache import FIRST_BLOCK_CACHE_DENOISERS, first_block_cache_refusal
from autoquant.planner import load_settings, plan


def test_the_cacheable_denoisers_are_those_diffusers_can_cache() -> None:
    for name in FIRST_BLOCK_CACHE_DENOISERS:
        assert issubclass(getattr(diffusers, name), CacheMixin), name
    for name in ("UNet2DConditionModel", "SD3Transformer2DModel"):
        assert not issubclass(getattr(diffusers, name), CacheMixin), name
    assert first_block_cache_refusal(inventory(resolve("builtin:flux-dev"))) is None
    refusal = first_block_cache_refusal(inventory(resolve("builtin:sdxl")))
    assert refusal is not None and "UNet2DConditionModel" in refusal


def test_the_cache_goes_on_every_plan_uncompiled_and_is_said() -> None:
    h200 = made_up_machine(device="cuda", vram=141 * GB, compute_capability="9.0")
    settings = load_settings((), ["planner.cache=first-block", "planner.cache_threshold=0.1"])
    cached = plan(h200, "builtin:flux-dev", settings)
    for planned in (cached.chosen, *cached.ladder):
        assert planned.tier.first_block_cache == 0.1 and not planned.tier.compiled
        assert "first-block cache 0.1" in planned.label
        assert planned.tier.precision != "float8"  # pays only compiled: not offered
    assert any("step cache: first-block, threshold 0.1" in line for line in cached.path)
    plain = plan(h200, "builtin:flux-dev", load_settings((), ["planner.expected_images=1000"]))
    assert all(p.tier.first_block_cache is None for p in (plain.chosen, *plain.ladder))
    assert any(p.tier.compiled for p in (plain.chosen, *plain.ladder))


@pytest.mark.parametrize(
    ("model", "overrides", "expected"),
    [
        ("builtin:sdxl", [], "has no first-block cache"),
        ("builtin:flux-dev", ["planner.compile=always"], "cannot be compiled"),
    ],
)
def test_the_planner_refuses_what_the_cache_cannot_do(
    model: str, overrides: list[str], expected: str
) -> None:
    settings = load_settings((), ["planner.cache=first-block", *overrides])
    with pytest.raises(AutoquantError, match=expected):
        plan(made_up_machine(device="cuda", vram=80 * GB), model, settings)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "builtin:sdxl", "--cache", "first-block"], "has no first-block cache"),
        (["--cache-threshold", "0.1"], "--cache-threshold needs --cache first-block"),
        (["--cache", "first-block", "--cache-threshold", "2"], "greater than 0 and at most 1"),
        (["--cache", "later"], "invalid choice"),
    ],
)
def test_bad_cache_flags_are_one_line_and_exit_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoquant.cli.main import main

    try:
        code = main(["plan", "-m", "builtin:tiny-flux", *args])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_tier_and_spec_carry_the_threshold() -> None:
    tier = Tier("none", "bf16", "bf16", (), ("vae_tiling",), first_block_cache=0.2)
    assert tier.label == "none bf16 (vae tiling, first-block cache 0.2)"
    assert Tier.from_dict(tier.to_dict()) == tier
    old = {k: v for k, v in tier.to_dict().items() if k != "first_block_cache"}
    assert Tier.from_dict(old) == replace(tier, first_block_cache=None)
    spec = TierSpec.of_tier(tier)
    assert spec.name == "none:bf16+vae_tiling+first_block_cache=0.2"
    assert TierSpec.parse(spec.name) == spec
    assert TierSpec.parse("none:bf16+first_block_cache").first_block_cache == 0.05
    for bad in ("first_block_cache=0", "first_block_cache=x", "first_block_cache+compile"):
        with pytest.raises(AutoquantError):
            TierSpec.parse(f"none:bf16+{bad}")


def test_the_cache_skips_steps_on_tiny_flux() -> None:
    """Without the cache every forward runs in full; at threshold 1 every step after the first
    is skipped on random weights (their residual changes by less than itself). The cache's
    state is reset after each call, so two calls alike give one image."""
    import torch

    import autoquant
    from autoquant.execute.build import enable_first_block_cache

    pipe = autoquant.load(
        "builtin:tiny-flux", progress=False, use_cache=False, compile="never", oom_guard=False
    )
    assert pipe.autoquant_report["chosen"]["first_block_cache"] is None

    def generate() -> tuple[np.ndarray, int, int]:
        with full_forwards(pipe.transformer) as counts:
            out = pipe(
                prompt="a cat",
                num_inference_steps=6,
                width=64,
                height=64,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
        return np.asarray(out.images), counts.forwards, counts.full

    full_image, forwards, full = generate()
    assert (forwards, full) == (6, 6)
    enable_first_block_cache(pipe, inventory(resolve("builtin:tiny-flux")), 1.0)
    first, forwards, full = generate()
    assert (forwards, full) == (6, 1)
    second, _, full = generate()
    assert full == 1
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, full_image)


def test_the_bench_never_holds_a_cached_tier_against_an_uncached_plan() -> None:
    from test_bench import _record

    from autoquant.bench.budgets import budget_rows
    from autoquant.planner.estimate import Request

    records = [
        _record("none:bf16", peak=0.6, ms=20.0, error=2.3e-3),
        # Faster and of the same class by its weights, but lossy beyond it.
        _record("none:bf16+first_block_cache=0.5", peak=0.6, ms=5.0, error=2.3e-3),
    ]
    records[1]["tier"]["first_block_cache"] = 0.5
    (row,) = budget_rows(
        records,
        [4.0],
        inventory=inventory(resolve("builtin:tiny-flux")),
        profile=made_up_machine(device="cuda", vram=80 * GB),
        settings=load_settings((), ["planner.compile=never"]),
        request=Request(64, 64),
        on_cuda=True,
    )
    assert row["plan_measured_as"] == "none:bf16"
    assert (row["best"], row["latency_ratio"]) == ("none:bf16", 1.0)


def test_run_reports_the_forwards_the_cache_let_run_in_full(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoquant",
            "run",
            "-m",
            "builtin:tiny-flux",
            "--cache",
            "first-block",
            "--cache-threshold",
            "1",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["generation"]["forwards"], report["generation"]["full_forwards"]) == (4, 1)
    assert any("first-block cache 1 on: lossy" in w for w in report["warnings"])
