"""The `autoquant` command as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autoquant.probe import probe


def _command() -> list[str]:
    script = Path(sys.executable).parent / "autoquant"
    return [str(script)] if script.exists() else [sys.executable, "-m", "autoquant"]


def aq(
    *args: str, cache: Path | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if cache is not None:
        env["AUTOQUANT_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [*_command(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def one_line_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_help() -> None:
    assert aq("--version").stdout.startswith("autoquant ")
    for command in ("probe", "models", "plan", "run", "convert"):
        proc = aq(command, "--help")
        assert proc.returncode == 0 and "usage: autoquant" in proc.stdout


def test_probe_json_on_this_machine() -> None:
    proc = aq("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    # Whatever this machine is, the command says what the in-process probe says.
    here = probe()
    assert data["accelerator"] == here.accelerator
    assert [g["name"] for g in data["gpus"]] == [g.name for g in here.gpus]
    assert data["cpu"]["bf16"] == here.cpu.bf16
    bnb = data["backends"]["bitsandbytes"]
    if data["accelerator"] == "cpu":
        assert data["gpus"] == []
        assert bnb["usable"] is False and "CUDA" in bnb["reason"]
    assert aq("probe").returncode == 0


def test_probe_emulates_a_gpu() -> None:
    data = json.loads(aq("probe", "--json", "--vram", "8GB", "--device", "cuda").stdout)
    assert data["accelerator"] == "cuda" and len(data["gpus"]) == 1
    assert data["gpus"][0]["total_bytes"] == 8 * 10**9
    assert "accelerator" in data["emulated"] and data["backends"]["bitsandbytes"]["usable"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["probe", "--vram", "banana"], "cannot read size 'banana'"),
        (["probe", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["run", "--model", "/no/such/folder"], "no such folder"),
        (["run", "--backend", "nosuch"], "unknown backend 'nosuch'"),
        (["run", "--model", "builtin:nope"], "no built-in model 'nope'"),
        (["plan", "--set", "planner.no_such=1"], "unknown key 'planner.no_such'"),
        (["run", "--size", "1000x1000x3"], "must be WIDTHxHEIGHT"),
        (["convert", "builtin:tiny-sd", "--to", "q3_k"], "choose one of q8_0"),
        (["run", "--vram-limit", "6GB"], "caps a real CUDA GPU"),
        (["run", "--guidance-scale", "31"], "must be a number from 0 to 30"),
        (["run", "--guidance-scale", "nan"], "must be a number from 0 to 30"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    one_line_error(aq(*args), expected)


def test_models_lists_every_builtin() -> None:
    data = json.loads(aq("models", "--json").stdout)
    names = {entry["name"] for entry in data}
    assert names == {"tiny-sd", "tiny-flux", "sd15", "sdxl", "flux-dev"}
    sdxl = next(e for e in data if e["name"] == "sdxl")
    assert {c["name"]: c["params"] for c in sdxl["components"]}["unet"] == 2_567_463_684
    assert aq("models").returncode == 0


def test_run_with_no_arguments_writes_an_image_and_a_report(tmp_path: Path) -> None:
    proc = aq("run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "autoquant-out"
    report = json.loads((out / "report.json").read_text())
    assert {"chosen", "tried", "probe", "plan", "measured"} <= set(report)
    assert {"backend", "precision"} <= set(report["chosen"])
    assert all({"backend", "precision", "outcome", "error"} <= set(t) for t in report["tried"])
    assert report["model"] == "builtin:tiny-sd"
    assert (out / "image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "chosen:" in proc.stdout and (out / "report.md").exists()
    # The generation's own step time (timed in it), apart from the smoke test's.
    generation, measured = report["generation"], report["measured"]
    assert generation["steps"] == 20 and 0 < generation["step_seconds"] < generation["seconds"]
    assert measured["smoke_step_seconds"] > 0 and "step_seconds" not in measured
    step, total = generation["step_seconds"], generation["seconds"]
    assert f"step: {step:.3f} s, in all: {total:.3f} s" in (out / "report.md").read_text()
    assert f"generation: 20 steps at 64x64, {step:.3f} s/step" in proc.stdout
    assert "load + smoke test): measured" in proc.stdout and "estimated need" in proc.stdout
    # A second run never overwrites the first one's files.
    first = (out / "report.json").read_bytes()
    second = aq("run", "--json", "--steps", "1", cwd=tmp_path)
    assert second.returncode == 0
    assert (out / "report.json").read_bytes() == first and (out / "report-2.json").exists()
    assert json.loads(second.stdout)["generation"]["step_seconds"] is None  # no gap to time
    # --guidance-scale reaches the pipeline: 0 turns guidance off, and the image changes.
    third = aq("run", "--json", "--steps", "1", "--guidance-scale", "0", cwd=tmp_path)
    assert third.returncode == 0 and json.loads(third.stdout)["generation"]["guidance_scale"] == 0
    assert (out / "image-3.png").read_bytes() != (out / "image-2.png").read_bytes()


def test_convert_caches_and_rebuilds_a_truncated_file(tmp_path: Path) -> None:
    first = aq("convert", "builtin:tiny-sd", "--to", "q4_0", cache=tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("written"), first.stderr
    second = aq("convert", "builtin:tiny-sd", "--to", "q4_0", cache=tmp_path)
    assert second.stdout.startswith("cache hit")
    path = Path(second.stdout.split(": ", 1)[1].split(" (")[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    third = aq("convert", "builtin:tiny-sd", "--to", "q4_0", cache=tmp_path)
    assert third.stdout.startswith("rebuilt"), third.stdout + third.stderr
    assert path.read_bytes() == data


def test_a_local_folder_runs_like_a_builtin(tmp_path: Path, session_cache: Path) -> None:
    from autoquant import models

    folder = models.materialize(models.resolve("builtin:tiny-sd"), progress=False)
    mine = tmp_path / "my-model"
    shutil.copytree(folder, mine)
    proc = aq("run", "--model", str(mine), "--steps", "2", "--out", str(tmp_path / "o"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == str(mine)


def test_hub_id_fails_fast_offline() -> None:
    proc = aq("run", "--model", "stabilityai/sdxl-turbo")
    one_line_error(proc, "sdxl-turbo")


def test_a_folder_that_ships_only_fp16_variant_weights_runs(tmp_path: Path) -> None:
    # `save_pretrained(variant="fp16")` names every weights file *.fp16.safetensors, which
    # diffusers loads only when told the variant; autoquant uses the only variant there is.
    from diffusers import DiffusionPipeline

    from autoquant import models

    folder = models.materialize(models.resolve("builtin:tiny-sd"), progress=False)
    mine = tmp_path / "fp16-only"
    DiffusionPipeline.from_pretrained(str(folder)).save_pretrained(str(mine), variant="fp16")
    assert not list(mine.glob("*/diffusion_pytorch_model.safetensors"))
    assert list(mine.glob("unet/diffusion_pytorch_model.fp16.safetensors"))
    for backend in ("none", "gguf"):
        out = tmp_path / backend
        proc = aq("run", "-m", str(mine), "--steps", "1", "--backend", backend, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert (out / "image.png").read_bytes()[:4] == b"\x89PNG"
