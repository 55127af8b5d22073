"""LoRA on the tuned pipeline (execute/lora.py): on every tier the CPU runs, the LoRA changes the
image and the report says whether it was fused; it is never silently dropped; bad files are
refused in one line; the tuning cache never replays a decision made without it."""

from __future__ import annotations

import dataclasses
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from machines import made_up_machine
from tiny import tiny_image

import autoquant
from autoquant import models
from autoquant.backends import backend_class
from autoquant.backends.quanto import Quanto
from autoquant.bench.command import usable_tiers
from autoquant.cli.main import main
from autoquant.core.errors import AutoquantError
from autoquant.execute.lora import LoraFile, lora_files, parse_lora
from autoquant.execute.tuning import TuneOptions, make_plan, tune
from autoquant.execute.tuning_entry import tuning_key
from autoquant.models.identity import model_identity

MODEL = "builtin:tiny-sd"
SCALE = 0.5
# Every backend and precision a CPU runs (bitsandbytes and float8 are refused there).
CPU_TIERS = [(spec.backend, spec.precision) for spec in usable_tiers(made_up_machine())]
# Measured here: only unquantized weights keep a fused LoRA (the backends' fuses_lora).
FUSING_BACKENDS = {"none"}
# The LoRA at SCALE moves these images' pixels (0..1) by at least ~0.01 on average.
CHANGED = 2e-3


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory, session_cache: Path) -> Path:
    """A LoRA of tiny-sd's UNet attention projections with random non-zero lora_B, saved as
    diffusers saves a trained one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOQUANT_CACHE_DIR", str(session_cache))
        folder = models.materialize(models.resolve(MODEL), progress=False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero: a LoRA that changes nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


def _options(**kw: Any) -> TuneOptions:
    side = {"width": 64, "height": 64, "smoke_size": 64, "smoke_steps": 1}
    return TuneOptions(model=MODEL, device="cpu", progress=False, use_cache=False, **side, **kw)


def _lora_layers(pipe: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_every_backend_the_cpu_runs_is_covered() -> None:
    assert {backend for backend, _ in CPU_TIERS} == {"none", "gguf", "quanto", "torchao"}


@pytest.mark.parametrize(
    ("backend", "precision"), CPU_TIERS, ids=[f"{b}-{p}" for b, p in CPU_TIERS]
)
def test_the_lora_changes_the_image_on_every_cpu_tier(
    backend: str, precision: str, lora_path: Path
) -> None:
    result = tune(
        _options(backend=backend, precision=precision, lora=(LoraFile(lora_path, SCALE),))
    )
    assert (result.chosen.tier.backend, result.chosen.tier.precision) == (backend, precision)
    fused = backend in FUSING_BACKENDS
    assert backend_class(backend).fuses_lora == fused
    [record] = result.report()["lora"]
    assert record["path"] == str(lora_path) and record["scale"] == SCALE
    assert record["fused"] == fused
    assert record["note"].startswith("LoRA fused" if fused else "LoRA kept unfused")
    with_lora = tiny_image(result.pipeline)
    layers = _lora_layers(result.pipeline)
    if fused:
        assert not layers  # fused into the weights, its adapter unloaded
        plain = tune(_options(backend=backend, precision=precision)).pipeline
        without = tiny_image(plain)
        # The fused image is the one the same LoRA gives as an adapter at the same scale: to
        # float rounding at fp32, and nearer it than to the image without at 16 bits (where
        # rounding the fused weights moves this random tiny UNet's image about half as far as
        # the LoRA does).
        plain.load_lora_weights(str(lora_path), adapter_name="reference")
        plain.set_adapters(["reference"], [SCALE])
        reference = tiny_image(plain)
        assert _difference(with_lora, reference) < _difference(with_lora, without)
        if precision == "fp32":
            assert _difference(with_lora, reference) < 1e-4
    else:
        assert layers and all(layer.active_adapters == ["lora_0"] for layer in layers)
        # alpha / r is 1 here, so the adapter's scaling is the scale asked for.
        assert {layer.scaling["lora_0"] for layer in layers} == {SCALE}
        result.pipeline.disable_lora()
        without = tiny_image(result.pipeline)
    assert _difference(with_lora, without) > CHANGED


def test_a_tier_whose_fusing_drops_the_lora_fails_with_the_reason(
    lora_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What diffusers 0.42.1 does to quanto's weights, declared fusable here for the test.
    monkeypatch.setattr(Quanto, "fuses_lora", True)
    with pytest.raises(AutoquantError, match=r"forced tier quanto int8 failed.*lost 100%"):
        tune(_options(backend="quanto", precision="int8", lora=(LoraFile(lora_path),)))


def test_a_tier_that_cannot_take_the_lora_falls_to_the_next(
    lora_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline

    # A fuse that keeps nothing (quanto's, in diffusers 0.42.1) on the unquantized first tier.
    monkeypatch.setattr(StableDiffusionPipeline, "fuse_lora", lambda self, **_kw: None)
    result = tune(_options(lora=(LoraFile(lora_path, SCALE),)))
    first, chosen = result.attempts[0], result.attempts[-1]
    assert (first.backend, first.outcome, first.phase) == ("none", "error", "load")
    assert "fusing the LoRA into none" in (first.error or "")
    assert chosen.outcome == "chosen" and chosen.backend != "none"
    [record] = result.report()["lora"]
    assert record["fused"] is False
    assert _lora_layers(result.pipeline)


def test_a_lora_that_matches_no_layer_fails_the_tier(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # A LoRA of a Flux transformer: diffusers finds nothing of it to load here, and says so
    # only in a warning.
    stray = tmp_path / "flux.safetensors"
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    save_file(
        {f"{prefix}.lora_A.weight": torch.ones(4, 8), f"{prefix}.lora_B.weight": torch.ones(8, 4)},
        str(stray),
    )
    with pytest.raises(AutoquantError, match=r"flux\.safetensors matched no layer"):
        tune(_options(backend="none", precision="fp32", lora=(LoraFile(stray),)))


def test_the_tier_moved_down_to_after_out_of_memory_keeps_the_lora(
    lora_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoquant.execute.recover import generate

    result = tune(_options(lora=(LoraFile(lora_path, SCALE),)))
    first = result.chosen.label
    assert result.report()["lora"][0]["fused"]
    first_unet = weakref.ref(result.pipeline.unet)  # a reference would keep the tier alive
    pipeline_class = type(result.pipeline)
    real_call = pipeline_class.__call__

    def out_of_memory_on_the_first_tier(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.unet is first_unet():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", out_of_memory_on_the_first_tier)
    generate(result, lambda _m: None, prompt="a cat", num_inference_steps=1, width=64, height=64)
    assert result.chosen.label != first
    [record] = result.report()["lora"]
    assert record["fused"] is False and "kept unfused" in record["note"]
    assert {layer.scaling["lora_0"] for layer in _lora_layers(result.pipeline)} == {SCALE}


def test_load_takes_a_path_or_pairs(lora_path: Path) -> None:
    pipe = autoquant.load(
        MODEL,
        lora=[(lora_path, SCALE)],
        backend="gguf",
        precision="q8_0",
        device="cpu",
        progress=False,
        use_cache=False,
        smoke_size=64,
    )
    assert pipe.autoquant_report["lora"][0]["scale"] == SCALE
    assert not pipe.autoquant_report["lora"][0]["fused"]
    assert lora_files(lora_path) == (LoraFile(lora_path),)
    assert lora_files((str(lora_path), 2)) == (LoraFile(lora_path, 2.0),)


def test_flag_syntax() -> None:
    assert parse_lora("style.safetensors:0.8") == LoraFile(Path("style.safetensors"), 0.8)
    assert parse_lora("a:b.safetensors") == LoraFile(Path("a:b.safetensors"))
    assert parse_lora('{"lora_id": "s.safetensors", "lora_scale": -1}') == LoraFile(
        Path("s.safetensors"), -1.0
    )
    for bad in ("s.safetensors:nan", '{"lora_id": "s.safetensors", "adapter_name": "x"}'):
        with pytest.raises(ValueError):
            parse_lora(bad)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("style.bin", b"\x80\x04pickle", "is a pickled file"),
        ("style.pt", b"\x80\x04pickle", "is a pickled file"),
        ("missing.safetensors", None, "no such file"),
        ("renamed.safetensors", b"\x80\x04not a header", "is not a safetensors file"),
    ],
)
def test_a_bad_lora_file_is_one_line_and_exit_2(
    name: str,
    content: bytes | None,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code = main(["run", "--lora", f"{path}:0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and str(path) in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(AutoquantError, match=message):
        autoquant.load(MODEL, lora=path, device="cpu", progress=False)


def test_without_peft_a_lora_is_one_line(
    lora_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoquant.execute import lora

    monkeypatch.setattr(lora, "module_present", lambda module: module != "peft")
    assert main(["run", "--lora", str(lora_path)]) == 2
    assert "pip install 'autoquant-diffusers[lora]'" in capsys.readouterr().err


def test_the_cache_never_replays_a_tuning_made_without_the_lora(
    lora_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    the_plan, profile, _ = make_plan(_options())
    identity = model_identity(models.materialize(models.resolve(MODEL), progress=False))
    plain = tuning_key(profile, the_plan, identity)
    with_lora = tuning_key(profile, the_plan, identity, (LoraFile(lora_path),))
    assert "lora" not in plain.fields  # keys of runs without a LoRA are the ones they were
    assert with_lora.digest != plain.digest
    # The scale changes no tier's memory: the same key. Another file (or this one rewritten)
    # does not.
    assert tuning_key(profile, the_plan, identity, (LoraFile(lora_path, 0.3),)) == with_lora
    rewritten = tmp_path / lora_path.name
    rewritten.write_bytes(lora_path.read_bytes())
    os.utime(rewritten, ns=(1, 1))
    assert tuning_key(profile, the_plan, identity, (LoraFile(rewritten),)) != with_lora

    tune(dataclasses.replace(_options(), use_cache=True))
    again = tune(dataclasses.replace(_options(lora=(LoraFile(lora_path),)), use_cache=True))
    assert again.cache is not None and not again.cache["hit"]
    assert again.cache["key"] == with_lora.digest
