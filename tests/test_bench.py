"""`autoquant bench`: the sweep on tiny-sd on the CPU end to end, and its parts on made-up data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from machines import CPU_FLAGS, made_up_machine

import autoquant.probe
from autoquant.bench import TierSpec, parse_tier_list
from autoquant.bench import command as bench_command
from autoquant.bench.budgets import GB, budget_rows, confirm_targets, parse_budgets
from autoquant.bench.fidelity import psnr, quality_score, ssim
from autoquant.cli.main import main
from autoquant.core.errors import AutoquantError

SWEEP_TIERS = "none:fp32,none:bf16,gguf:q8_0,gguf:q4_0,quanto:int8,torchao:int8"
# diffusers refuses bitsandbytes on the CPU: its process fails at load, the sweep goes on.
FAILING_TIER = "bitsandbytes:nf4"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, session_cache: Path) -> Path:
    """One real sweep in subprocesses, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "AUTOQUANT_CACHE_DIR": str(session_cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoquant",
            "bench",
            "--model",
            "builtin:tiny-sd",
            "--tiers",
            f"{SWEEP_TIERS},{FAILING_TIER}",
            "--repeats",
            "2",
            "--size",
            "64x64",
            "--budgets",
            "4,8",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _bench(out: Path) -> dict[str, Any]:
    return json.loads((out / "bench.json").read_text())


def _tiers(out: Path) -> dict[str, dict[str, Any]]:
    return {t["spec"]: t for t in _bench(out)["tiers"]}


def test_sweep_measures_every_tier_with_the_reference_first(sweep: Path) -> None:
    bench = _bench(sweep)
    assert [t["spec"] for t in bench["tiers"]] == [*SWEEP_TIERS.split(","), FAILING_TIER]
    assert bench["reference"] == "none:fp32" and bench["tiers"][0]["reference"]
    failed = bench["tiers"][-1]
    assert (failed["status"], failed["phase"]) == ("error", "load")
    assert "GPU" in failed["error"] and failed["latency_ms"] is None
    for tier in bench["tiers"][:-1]:
        assert tier["status"] == "ok", tier["error"]
        assert tier["weights_bytes"] > 0 and tier["peak_bytes"] >= tier["weights_bytes"]
        assert tier["load_seconds"] > 0 and tier["e2e_seconds"] > 0
        latency = tier["latency_ms"]
        assert latency["repeats"] == 2 and latency["min"] <= latency["median"] <= latency["max"]
        assert tier["denoiser_file_bytes"] > 0
        assert isinstance(tier["estimate_error_pct"], float)
        assert tier["fidelity"]["errors"] == {}
        assert tier["fidelity"]["layers_compared"] > 0 and tier["fidelity"]["layers_failed"] == 0
        hardware = tier["hardware"]  # in every row, as llama-bench does
        assert hardware["torch"] and hardware["diffusers"] and hardware["cpu"]
        assert hardware["backend"] == tier["tier"]["backend"]
    assert (sweep / "tiers" / "gguf-q4_0.json").is_file()


def test_fidelity_ranks_the_tiers(sweep: Path) -> None:
    tiers = _tiers(sweep)
    fid = {spec: t["fidelity"] for spec, t in tiers.items()}
    reference = fid["none:fp32"]
    assert reference["per_layer_error_median"] == 0.0
    assert reference["denoiser_output_error"] == 0.0
    assert reference["psnr_db"] is None and reference["ssim"] == 1.0
    assert reference["quality_score"] == 100.0
    q8, q4 = fid["gguf:q8_0"], fid["gguf:q4_0"]
    assert q4["per_layer_error_median"] > q8["per_layer_error_median"] > 0
    assert q8["per_layer_error_median"] > fid["none:bf16"]["per_layer_error_median"] > 0
    assert q4["denoiser_output_error"] > q8["denoiser_output_error"] > 0
    assert q8["psnr_db"] > q4["psnr_db"] and q8["ssim"] > q4["ssim"]
    assert 100 > q8["quality_score"] > q4["quality_score"]
    for spec in ("quanto:int8", "torchao:int8"):
        assert 1e-3 < fid[spec]["per_layer_error_median"] < 3e-2
    assert tiers["gguf:q4_0"]["denoiser_file_bytes"] < tiers["gguf:q8_0"]["denoiser_file_bytes"]


def test_every_budget_row_names_the_plan_and_says_how_fits_are_judged(sweep: Path) -> None:
    bench = _bench(sweep)
    assert "CPU run" in bench["fit_rule"] and "estimate" in bench["fit_rule"]
    assert [row["budget_gb"] for row in bench["budgets"]] == [4.0, 8.0]
    for row in bench["budgets"]:
        assert row["plan"]["label"] and row["plan"]["spec"]
        assert row["plan_measured_as"] in _tiers(sweep)
        assert set(row["fits"]) == set(SWEEP_TIERS.split(","))  # the failed tier fits nothing
        assert row["latency_ratio"] is not None and row["latency_ratio"] > 0


def test_markdown_and_png(sweep: Path) -> None:
    text = (sweep / "bench.md").read_text()
    assert "## Tiers" in text and "## Budgets" in text
    assert "| budget GB | tiers that fit | plan's choice |" in text
    assert "100 × (1 − mean|a − b|/255)" in text
    for spec in SWEEP_TIERS.split(","):
        assert f"`{spec}`" in text
    png = (sweep / "bench.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.pyplot as plt

    assert plt.imread(str(sweep / "bench.png")).shape[0] > 100


def test_resume_and_report_only_reuse_the_measured_tiers(sweep: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (sweep / "tiers").glob("*.json")}
    tiers = f"{SWEEP_TIERS},{FAILING_TIER}"
    args = ["--model", "builtin:tiny-sd", "--tiers", tiers, "--size", "64x64"]
    assert main(["bench", *args, "--out", str(sweep), "--resume", "--budgets", "6"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (sweep / "tiers").glob("*.json")}
    assert after == before  # nothing measured again
    assert [row["budget_gb"] for row in _bench(sweep)["budgets"]] == [6.0]
    assert main(["bench", *args, "--out", str(sweep), "--report-only"]) == 0
    assert len(_bench(sweep)["budgets"]) == 8  # the default budgets


def test_report_only_judges_old_measurements_with_the_current_estimator(
    sweep: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(sweep, out)
    path = out / "tiers" / "gguf-q8_0.json"
    record = json.loads(path.read_text())
    record["estimate"]["required_bytes"], record["estimate_error_pct"] = 1, 999.0
    path.write_text(json.dumps(record))
    args = ["--model", "builtin:tiny-sd", "--size", "64x64", "--out", str(out), "--report-only"]
    assert main(["bench", *args]) == 0
    row = _tiers(out)["gguf:q8_0"]
    assert row["estimate_error_pct_when_measured"] == 999.0
    assert row["estimate"]["required_bytes"] > 1 and abs(row["estimate_error_pct"]) < 999
    assert "estimate_error_pct_when_measured" not in _tiers(out)["gguf:q4_0"]


def _fake_children(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    def command(*_args: Any, **_kwargs: Any) -> list[str]:
        return [sys.executable, "-c", code]

    monkeypatch.setattr(bench_command, "_tier_command", command)


def test_a_crashed_or_hung_tier_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_children(monkeypatch, "import sys; print('boom', file=sys.stderr); sys.exit(3)")
    args = ["--model", "builtin:tiny-sd", "--tiers", "none:fp32,gguf:q8_0", "--budgets", "8"]
    assert main(["bench", *args, "--out", str(tmp_path / "crash")]) == 0
    tiers = _tiers(tmp_path / "crash")
    assert [t["status"] for t in tiers.values()] == ["crashed", "crashed"]
    assert "exited with 3" in tiers["gguf:q8_0"]["error"] and "boom" in tiers["gguf:q8_0"]["error"]

    _fake_children(monkeypatch, "import time; time.sleep(60)")
    out = tmp_path / "hang"
    assert main(["bench", *args, "--out", str(out), "--tier-timeout", "1"]) == 0
    assert {t["status"] for t in _tiers(out).values()} == {"timeout"}


_PEAKS = {"none:bf16": 9.0, "bitsandbytes:nf4": 3.0}


def _completed_run(_command: list[str]) -> bench_command.ChildOutcome:
    report = {
        "chosen": {"label": "none bf16"},
        "adjustments": [],
        "tried": [{"label": "none bf16", "outcome": "chosen"}],
        "measured": {"peak_bytes": 10},
        "probe": {"gpus": [{"name": "Made-up GPU"}]},
    }
    return bench_command.ChildOutcome(0, False, json.dumps(report), [], 1.0)


def _fake_gpu_children(
    monkeypatch: pytest.MonkeyPatch,
    commands: list[list[str]],
    autoquant_run: Callable[[list[str]], bench_command.ChildOutcome] = _completed_run,
    *,
    cpu: str,
) -> None:
    """Fake the machine: an 80 GB GPU on a host of the ``cpu`` kind (machines.CPU_FLAGS), tier
    children that write made-up records, `autoquant run` children that answer what
    ``autoquant_run`` says."""
    from autoquant.bench.tier_run import tier_result_path

    def fake_child(command: list[str], timeout: float | None) -> bench_command.ChildOutcome:
        commands.append(command)
        if "autoquant.bench.tier_run" not in command:  # autoquant run --json
            return autoquant_run(command)

        def value(flag: str) -> str | None:
            return command[command.index(flag) + 1] if flag in command else None

        spec = TierSpec.parse(str(value("--spec")))
        path = Path(value("--result") or tier_result_path(Path(str(value("--out"))), spec))
        path.parent.mkdir(parents=True, exist_ok=True)
        record = _record(spec.name, peak=_PEAKS[spec.name], ms=10.0, error=1e-2)
        record["latency_ms"].update(min=9.0, max=11.0, repeats=10)
        record.update(reference="--reference" in command, device="cuda")
        path.write_text(json.dumps(record))
        return bench_command.ChildOutcome(0, False, "", [], 1.0)

    machine = made_up_machine(cpu=cpu, device="cuda", vram=80 * GB, compute_capability="9.0")
    monkeypatch.setattr(autoquant.probe, "probe", lambda **_kw: machine)
    monkeypatch.setattr(bench_command, "run_child", fake_child)


@pytest.mark.parametrize("cpu", sorted(CPU_FLAGS))
def test_on_a_gpu_edge_tiers_are_confirmed_and_autoquant_run_is_tried_per_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: str
) -> None:
    """The CUDA-only orchestration, with the GPU faked: children write made-up results."""
    from autoquant.planner.estimate import CUDA_CONTEXT_BYTES

    commands: list[list[str]] = []
    _fake_gpu_children(monkeypatch, commands, cpu=cpu)
    args = ["--model", "builtin:tiny-sd", "--tiers", "bitsandbytes:nf4", "--budgets", "4,16"]
    assert main(["bench", *args, "--out", str(tmp_path), "--confirm", "--run-plan"]) == 0
    bench = _bench(tmp_path)
    assert bench["reference"] == "none:bf16" and "measured peak" in bench["fit_rule"]
    small, large = bench["budgets"]
    assert small["fits"] == ["bitsandbytes:nf4"] and small["plan_fits_measured"] is False
    assert large["plan_measured_as"] == "none:bf16" and large["plan_fits_measured"] is True
    assert [(c["budget_gb"], c["spec"], c["status"]) for c in bench["confirm"]] == [
        (4.0, "bitsandbytes:nf4", "ok"),
        (16.0, "none:bf16", "ok"),
    ]
    assert bench["confirm"][0]["cap_bytes"] == 4 * GB - CUDA_CONTEXT_BYTES
    assert "--vram-cap" in commands[2] and "--no-fidelity" in commands[2]
    assert [(r["budget_gb"], r["completed"], r["chosen"]) for r in bench["run_plan"]] == [
        (4.0, True, "none bf16"),
        (16.0, True, "none bf16"),
    ]
    run_4gb = commands[-2]
    assert run_4gb[run_4gb.index("--vram-limit") + 1] == "4GB"
    assert bench["run_plan"][0]["card"] == "Made-up GPU"
    text = (tmp_path / "bench.md").read_text()
    assert "--confirm" in text and "--run-plan" in text and "**no**" in text
    # Each entry is its own file, so calls on fresh machines merge: unpacked into one folder,
    # --report-only finds them all.
    merged = tmp_path / "merged"
    for part in ("tiers", "confirm", "runs"):
        shutil.copytree(tmp_path / part, merged / part)
    (merged / "runs" / "4GB.json").unlink()
    assert main(["bench", *args, "--out", str(merged), "--report-only"]) == 0
    rebuilt = _bench(merged)
    assert rebuilt["confirm"] == bench["confirm"]
    assert [r["budget_gb"] for r in rebuilt["run_plan"]] == [16.0]


@pytest.mark.parametrize("cpu", sorted(CPU_FLAGS))
def test_a_run_killed_by_tier_timeout_is_a_failure_not_a_time_limit_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: str
) -> None:
    """--tier-timeout (60 s) bounds the run, not the time limit (100 s left when it starts):
    a hang is the run's failure, even though less than 60 s is left once it is killed."""
    clock = [0.0]
    monkeypatch.setattr(bench_command, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    def hanging_run(_command: list[str]) -> bench_command.ChildOutcome:
        clock[0] += 60.0
        return bench_command.ChildOutcome(-9, True, "", ["still loading"], 60.0)

    _fake_gpu_children(monkeypatch, [], hanging_run, cpu=cpu)
    args = ["--model", "builtin:tiny-sd", "--tiers", "bitsandbytes:nf4", "--budgets", "4"]
    limits = ["--time-limit", "100", "--tier-timeout", "60"]
    assert main(["bench", *args, *limits, "--out", str(tmp_path), "--run-plan"]) == 0
    bench = _bench(tmp_path)
    assert [(r["budget_gb"], r["completed"]) for r in bench["run_plan"]] == [(4.0, False)]
    assert "still loading" in bench["run_plan"][0]["error"]
    assert not any("time limit" in note for note in bench["notes"])


def test_the_time_limit_leaves_tiers_for_resume(tmp_path: Path) -> None:
    args = ["--model", "builtin:tiny-sd", "--tiers", "none:fp32,gguf:q8_0", "--budgets", "8"]
    assert main(["bench", *args, "--out", str(tmp_path), "--time-limit", "1"]) == 0
    bench = _bench(tmp_path)
    assert bench["tiers"] == [] and bench["pending"] == ["none:fp32", "gguf:q8_0"]
    assert "Not run" in (tmp_path / "bench.md").read_text()
    assert not list((tmp_path / "tiers").glob("*.json"))


def test_tier_specs() -> None:
    spec = TierSpec.parse("quanto:int8+model_cpu_offload+te+compile+vae_slicing")
    assert spec.name == "quanto:int8+te+vae_slicing+model_cpu_offload+compile"
    assert spec.file_stem == "quanto-int8-te-vae_slicing-model_cpu_offload-compile"
    assert TierSpec.parse(spec.name) == spec
    assert spec.without_vae_options().name == "quanto:int8+te+model_cpu_offload+compile"
    assert [s.name for s in parse_tier_list("none:bf16, gguf:q4_0,none:bf16")] == [
        "none:bf16",
        "gguf:q4_0",
    ]
    for bad in ("gguf", "gguf:q9", "gguf:q8_0+te", "none:bf16+model_cpu_offload+group_offload"):
        with pytest.raises(AutoquantError):
            TierSpec.parse(bad)
    with pytest.raises(AutoquantError, match="unknown extra"):
        TierSpec.parse("none:bf16+turbo")


def test_budgets_are_gb() -> None:
    assert parse_budgets("8, 4,4.5GB,8") == [4.0, 4.5, 8.0]
    for bad in ("", "4,x", "0"):
        with pytest.raises(AutoquantError):
            parse_budgets(bad)


def _record(spec: str, peak: float, ms: float, error: float, **extra: Any) -> dict[str, Any]:
    parsed = TierSpec.parse(spec)
    dtype = parsed.precision if parsed.backend == "none" else "bf16"
    return {
        "spec": spec,
        "status": "ok",
        "tier": {
            "backend": parsed.backend,
            "precision": parsed.precision,
            "compute_dtype": dtype,
            "components": [] if parsed.backend == "none" else ["unet"],
            "memory_options": list(parsed.memory_options),
        },
        "compile": parsed.compile,
        "request": {"width": 64, "height": 64, "batch": 1, "steps": 4},
        "peak_bytes": int(peak * GB),
        "load_peak_bytes": int(peak * GB / 2),
        "latency_ms": {"median": ms},
        "e2e_seconds": ms * 4 / 1000,  # 4 steps: plans are compared end to end
        "fidelity": {"per_layer_error_median": error},
        **extra,
    }


def test_budget_rows_on_a_gpu_judge_measured_peaks_and_the_latency_ratio() -> None:
    from autoquant import models
    from autoquant.planner.estimate import Request
    from autoquant.planner.rules import load_settings

    records = [
        _record("none:bf16", peak=0.6, ms=20.0, error=2.3e-3),
        _record("none:fp32", peak=1.2, ms=10.0, error=0.0),
        _record("gguf:q4_0", peak=0.3, ms=5.0, error=8e-2),
        # Compiled: fast steps, and 10 s of compile a single expected image carries whole.
        _record("none:bf16+compile", peak=0.6, ms=1.0, error=2.3e-3, compile_seconds=10.0),
        # Offloading: the UNet step is as fast as bf16's, the whole generation is not.
        _record("none:bf16+model_cpu_offload", peak=0.4, ms=2.0, error=2.3e-3, e2e_seconds=9.0),
        # Timed in another call at 2 steps: its generation is not comparable with 4-step ones.
        _record(
            "quanto:int8",
            peak=0.6,
            ms=1.0,
            error=0.0,
            request={"width": 64, "height": 64, "batch": 1, "steps": 2},
        ),
    ]

    def rows_with(*overrides: str) -> list[dict[str, Any]]:
        return budget_rows(
            records,
            [1.5, 4.0],
            inventory=models.inventory(models.resolve("builtin:tiny-sd")),
            profile=made_up_machine(device="cuda", vram=80 * GB),
            settings=load_settings((), ["planner.expected_images=1", *overrides]),
            request=Request(64, 64),
            on_cuda=True,
        )

    rows = rows_with()
    small, large = rows
    # peak + 0.65 GiB of CUDA context: fp32 (1.2 GB + 0.70) does not fit 1.5 GB.
    assert "none:fp32" not in small["fits"] and "none:fp32" in large["fits"]
    for row in rows:
        assert row["plan"]["spec"] == "none:bf16" and row["plan_measured_as"] == "none:bf16"
        assert row["plan_fits_measured"] is True
    # The compiled tier carries its 10 s of compile over one image: not the best.
    assert (small["best"], small["latency_ratio"]) == ("none:bf16", 1.0)
    assert (large["best"], large["latency_ratio"]) == ("none:fp32", 2.0)
    assert confirm_targets(rows) == [(1.5, "none:bf16"), (4.0, "none:fp32")]
    # Where the user has accepted the compile (planner.compile always), its steps decide.
    for row in rows_with("planner.compile=always"):
        assert row["best"] == "none:bf16+compile"
        assert row["best_e2e_seconds"] == pytest.approx(0.004)


def _ssim_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM one window at a time, straight from Wang et al. (2004)."""
    offsets = np.arange(11) - 5
    taps = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mx, my = (window * x).sum(), (window * y).sum()
            vx = (window * (x - mx) ** 2).sum()
            vy = (window * (y - my) ** 2).sum()
            cov = (window * (x - mx) * (y - my)).sum()
            values.append(
                ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(values))


def test_image_metrics() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    expected = np.mean([_ssim_by_definition(a[..., c] * 1.0, b[..., c] * 1.0) for c in range(3)])
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert psnr(a, a) is None
    assert psnr(a, b) == pytest.approx(
        10 * np.log10(255**2 / np.mean((a * 1.0 - b) ** 2)), rel=1e-12
    )
    assert quality_score(a, a) == 100.0
    assert quality_score(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8)) == 0.0


def test_denoiser_call_round_trips_without_pickles(tmp_path: Path) -> None:
    import torch

    from autoquant.bench.tier_run import DenoiserCall

    latents = torch.randn(2, 4, 8, 8)
    call = DenoiserCall.record(
        (latents, torch.tensor(999.0)),
        {"added_cond_kwargs": {"time_ids": torch.ones(2, 6)}, "return_dict": False, "x": None},
    )
    call.save(tmp_path)
    loaded = DenoiserCall.load(tmp_path)
    own = DenoiserCall.record(
        (latents.bfloat16(), torch.tensor(999.0)),
        {"added_cond_kwargs": {"time_ids": torch.ones(2, 6)}, "return_dict": False, "x": None},
    )
    args, kwargs = loaded.shaped_like(own).arguments()
    assert args[0].dtype == torch.bfloat16 and args[1].dtype == torch.float32
    assert torch.equal(args[0], latents.bfloat16())
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert kwargs["return_dict"] is False and kwargs["x"] is None
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_a_tier_timed_at_another_step_count_says_so() -> None:
    from autoquant.bench.report import _e2e_cell

    record = _record("quanto:int8", peak=0.6, ms=10.0, error=1e-2)
    assert _e2e_cell(record, steps=4) == "0.04"
    assert _e2e_cell(record, steps=50) == "0.04 (4 steps)"


def test_planned_tiers_are_each_budgets_ladder_and_run_where_they_can() -> None:
    from autoquant.bench.budgets import planned_tiers
    from autoquant.models import inventory, resolve
    from autoquant.planner import load_settings, plan
    from autoquant.planner.estimate import Request
    from autoquant.probe import emulate

    inv = inventory(resolve("builtin:sdxl"))
    request = Request(1024, 1024, 1, 20)
    gpu = made_up_machine(cpu="bf16", device="cuda", vram=80 * GB, compute_capability="9.0")
    budgets = [4.0, 8.0, 24.0]
    planned = planned_tiers(gpu, inv, load_settings(), request, budgets)
    for budget in budgets:  # every budget's choice and fallbacks are in the sweep
        card = emulate(gpu, vram=int(budget * GB), device="cuda")
        for entry in plan(card, inv, load_settings(), request).ladder:
            assert TierSpec.of_tier(entry.tier) in planned
    assert len(planned) == len(set(planned))
    assert all(TierSpec.parse(spec.name) == spec for spec in planned)
    assert any(spec.offloaded for spec in planned)  # 4 GB needs offloading
    # On the GPU the keyword and explicit tiers combine, in order, without duplicates.
    both = bench_command.selected_tiers(
        "planned,none:fp32", profile=gpu, inventory=inv, request=request, budgets=budgets
    )
    assert both == [*planned, TierSpec("none", "fp32")]
    # On a CPU only what runs there is swept: no bitsandbytes, nothing offloaded.
    cpu = made_up_machine(cpu="bf16")
    on_cpu = bench_command.selected_tiers(
        "planned", profile=cpu, inventory=inv, request=request, budgets=budgets
    )
    assert on_cpu and all(s.backend != "bitsandbytes" and not s.offloaded for s in on_cpu)


def test_an_out_folder_holding_another_models_tiers_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warm machine's work folder held Flux-dev's tiers when an SDXL sweep started there: they
    must not be skipped as done (--resume) nor reported as SDXL's."""
    tiers = tmp_path / "tiers"
    tiers.mkdir()
    (tiers / "none-bf16.json").write_text(
        json.dumps({"spec": "none:bf16", "model": "builtin:flux-dev"})
    )
    args = ["bench", "--model", "builtin:tiny-sd", "--out", str(tmp_path), "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds tiers of builtin:flux-dev" in err
    assert sorted(p.name for p in tiers.iterdir()) == ["none-bf16.json"]  # nothing measured
