"""--variant: the weights variant of a local folder loads when named, wins over the one found
by itself, and a variant the folder lacks is one line naming the ones it has; sharded weights
load; the files a hub download takes for a variant."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from autoquant.cli.main import main
from autoquant.core.errors import ModelNotFoundError
from autoquant.execute.tuning import TuneOptions, tune
from autoquant.models import materialize, resolve
from autoquant.models.variant import hub_weight_files, weights_variant

# Exact in fp16, bf16 and fp32: whichever dtype the tier loads in, the weight reads back as is.
MARK = 0.5


@pytest.fixture(scope="module")
def pipe(session_cache: Path) -> Any:
    from diffusers import DiffusionPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOQUANT_CACHE_DIR", str(session_cache))
        folder = materialize(resolve("builtin:tiny-sd"), progress=False)
    return DiffusionPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def both(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Standard weights, and an fp16 variant whose unet conv_in weight is all MARK: which of the
    two loaded shows in that weight."""
    folder = tmp_path_factory.mktemp("variants") / "both"
    pipe.save_pretrained(str(folder))
    original = pipe.unet.conv_in.weight.detach().clone()
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(MARK)
    try:
        pipe.save_pretrained(str(folder), variant="fp16")
    finally:
        with torch.no_grad():
            pipe.unet.conv_in.weight.copy_(original)
    return folder


def _conv_in(model: str, variant: str | None, loads: str | None = None) -> torch.Tensor:
    """The unet's conv_in weight as ``tune`` loaded it with ``variant``; its report names the
    variant it ``loads`` (default: ``variant``)."""
    options = TuneOptions(
        model=model, variant=variant, device="cpu", progress=False, use_cache=False, smoke_steps=1
    )
    result = tune(options)
    assert result.report()["variant"] == (loads or variant)
    return result.pipeline.unet.conv_in.weight.detach().float()


def test_variant_loads_the_variant_and_standard_weights_load_without_it(both: Path) -> None:
    assert bool((_conv_in(str(both), "fp16") == MARK).all())
    assert not bool((_conv_in(str(both), None) == MARK).all())


def test_variant_wins_over_the_variant_found_by_itself(pipe: Any, tmp_path: Path) -> None:
    folder = tmp_path / "two-variants"
    pipe.save_pretrained(str(folder), variant="fp16")
    pipe.save_pretrained(str(folder), variant="bf16")
    with pytest.raises(ModelNotFoundError, match=r"several \(bf16, fp16\): pass --variant"):
        weights_variant(folder)
    assert weights_variant(folder, "bf16") == "bf16"
    assert _conv_in(str(folder), "bf16").shape == pipe.unet.conv_in.weight.shape


def test_a_variant_the_folder_lacks_is_one_line_naming_those_it_has(
    both: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("plan", "run"):
        assert main([command, "-m", str(both), "--variant", "bf16", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"autoquant: error: {both} has no bf16 weights variant; its weights: fp16, standard\n"
        )
    assert main(["plan", "-m", str(both), "--variant", "fp16.x"]) == 2
    assert "letters, digits and underscores" in capsys.readouterr().err


def test_sharded_variant_weights_load(pipe: Any, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    pipe.save_pretrained(str(folder), variant="fp16", max_shard_size="300KB")
    assert len(list(folder.glob("unet/diffusion_pytorch_model.fp16-*-of-*.safetensors"))) > 1
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert not list(folder.glob("*/*model.safetensors"))
    expected = pipe.unet.conv_in.weight.detach().float()
    for variant in (None, "fp16"):  # found by itself, or named
        loaded = _conv_in(str(folder), variant, loads="fp16")
        assert torch.allclose(loaded, expected, atol=1e-2)


def test_a_component_without_the_variant_loads_its_standard_weights(
    both: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "unet-only"
    shutil.copytree(both, folder)
    for name in (
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ):
        (folder / name).unlink()
    assert weights_variant(folder, "fp16") == "fp16"
    assert bool((_conv_in(str(folder), "fp16") == MARK).all())
    vae = folder / "vae"
    (vae / "diffusion_pytorch_model.safetensors").rename(
        vae / "diffusion_pytorch_model.bf16.safetensors"
    )
    with pytest.raises(ModelNotFoundError, match="vae ships neither fp16 nor standard weights"):
        weights_variant(folder, "fp16")


@pytest.mark.parametrize(
    ("variant", "weights"),
    [
        (None, ["unet/u.safetensors", "vae/v.safetensors"]),
        (
            "fp16",
            [
                "unet/u.fp16-00001-of-00002.safetensors",
                "unet/u.fp16-00002-of-00002.safetensors",
                "unet/u.safetensors.index.fp16.json",
                "vae/v.safetensors",
            ],
        ),
    ],
)
def test_a_hub_download_takes_one_copy_of_each_components_weights(
    variant: str | None, weights: list[str]
) -> None:
    repo = [
        "model_index.json",
        "README.md",
        "v1-5.safetensors",
        "unet/config.json",
        "unet/u.safetensors",
        "unet/u.bin",
        "unet/u.fp16-00001-of-00002.safetensors",
        "unet/u.fp16-00002-of-00002.safetensors",
        "unet/u.safetensors.index.fp16.json",
        "unet/u.non_ema.safetensors",
        "vae/config.json",
        "vae/v.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "vae_1_0/v.safetensors",
    ]
    files = hub_weight_files(repo, ["unet", "vae", "tokenizer"], variant, "org/x")
    configs = [
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "vae/config.json",
    ]
    assert sorted(files) == sorted(["model_index.json", *configs, *weights])
