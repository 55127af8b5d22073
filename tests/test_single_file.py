"""`-m FILE.safetensors`: a single-file checkpoint in the original Stable Diffusion layout is
converted once into the cache and then planned, built and run like any diffusers folder.

The checkpoint is made here: builtin:tiny-sd's weights, renamed into the original layout (the
keys CompVis' ldm code and single-file tools write) by a mapping written for this test, the
inverse of diffusers' single-file conversion. Converting it back must give the same tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoquant.cli.main import main
from autoquant.core.errors import ModelNotFoundError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
COMPONENT_WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
# diffusers' ResnetBlock2D names -> ldm's ResBlock names.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers' VAE attention (linear projections) -> ldm's AttnBlock (1x1 convolutions).
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def original_unet_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers UNet2DConditionModel key as ldm's UNetModel names it. ldm numbers its input
    blocks flat: conv_in, then per down block its layers and its downsampler; output blocks
    likewise, each up block having one layer more."""
    per_block = config["layers_per_block"] + 1
    module, _, leaf = key.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET}{UNET_TOP[module]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, index)]
        inner = _resnet(rest) if kind == "resnets" else ".".join(rest)
        return f"{UNET}middle_block.{slot}.{inner}"
    side, block, kind, index, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if side == "down_blocks":
        first = 1 + block * per_block
        if kind == "downsamplers":
            return f"{UNET}input_blocks.{first + per_block - 1}.0.op.{leaf}"
        inner = _resnet(rest) if kind == "resnets" else ".".join(rest)
        return f"{UNET}input_blocks.{first + index}.{0 if kind == 'resnets' else 1}.{inner}"
    assert side == "up_blocks", key
    first = block * per_block
    if kind == "upsamplers":
        # After the last layer's resnet, or after its resnet and attention.
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return f"{UNET}output_blocks.{first + per_block - 1}.{slot}.conv.{leaf}"
    inner = _resnet(rest) if kind == "resnets" else ".".join(rest)
    return f"{UNET}output_blocks.{first + index}.{0 if kind == 'resnets' else 1}.{inner}"


def _resnet(rest: list[str]) -> str:
    return ".".join([UNET_RESNET[rest[0]], *rest[1:]])


def original_vae_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers AutoencoderKL key as ldm's AutoencoderKL names it (decoder blocks counted
    from the lowest resolution up, the other way round)."""
    parts = key.split(".")
    if len(parts) < 3:  # quant_conv, post_quant_conv
        return VAE + key
    side, part = parts[0], parts[1]
    if part == "conv_norm_out":
        return f"{VAE}{side}.norm_out.{parts[2]}"
    if part in ("down_blocks", "up_blocks"):
        block, kind = int(parts[2]), parts[3]
        if side == "encoder":
            name, sampler = f"down.{block}", "downsample"
        else:
            name, sampler = f"up.{len(config['block_out_channels']) - 1 - block}", "upsample"
        if kind in ("downsamplers", "upsamplers"):
            return f"{VAE}{side}.{name}.{sampler}.conv.{parts[-1]}"
        inner = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{VAE}{side}.{name}.block.{parts[4]}.{inner}"
    if part == "mid_block":
        kind, index, inner = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            inner = inner.replace("conv_shortcut", "nin_shortcut")
            return f"{VAE}{side}.mid.block_{index + 1}.{inner}"
        module, _, leaf = inner.rpartition(".")
        return f"{VAE}{side}.mid.attn_1.{VAE_ATTENTION[module]}.{leaf}"
    return VAE + key  # conv_in, conv_out


def write_original_layout(folder: Path, out: Path) -> dict[str, dict[str, Any]]:
    """``folder``'s UNet, VAE and CLIP text encoder as one original-layout checkpoint at
    ``out``; returns the diffusers tensors it came from, by component."""
    import torch
    from safetensors.torch import load_file, save_file

    originals = {name: load_file(folder / path) for name, path in COMPONENT_WEIGHTS.items()}
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    checkpoint: dict[str, torch.Tensor] = {}
    for key, tensor in originals["unet"].items():
        checkpoint[original_unet_key(key, unet_config)] = tensor
    for key, tensor in originals["vae"].items():
        original = original_vae_key(key, vae_config)
        if ".mid.attn_1." in original and original.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # ldm's 1x1 convolution
        checkpoint[original] = tensor
    for key, tensor in originals["text_encoder"].items():
        checkpoint[CLIP + key] = tensor
    total = sum(len(tensors) for tensors in originals.values())
    assert len(checkpoint) == total, "two diffusers keys mapped to one original key"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, out)
    return originals


@pytest.fixture(scope="module")
def tiny_sd(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """(the original-layout file, the builtin:tiny-sd folder it came from, its tensors)."""
    from autoquant import models

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOQUANT_CACHE_DIR", str(session_cache))
        folder = models.materialize(models.resolve("builtin:tiny-sd"), progress=False)
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sd.safetensors"
    originals = write_original_layout(folder, path)
    yield path, folder, originals


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(cache))
    return cache


def converted_tensors(folder: Path) -> dict[str, dict[str, Any]]:
    from safetensors.torch import load_file

    return {name: load_file(folder / path) for name, path in COMPONENT_WEIGHTS.items()}


def assert_same_tensors(left: dict[str, dict[str, Any]], right: dict[str, dict[str, Any]]) -> None:
    import torch

    for name in COMPONENT_WEIGHTS:
        assert left[name].keys() == right[name].keys(), name
        for key, tensor in left[name].items():
            assert torch.equal(tensor, right[name][key]), f"{name}.{key}"


def conversions(cache: Path) -> list[Path]:
    root = cache / "single-file"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "digests")


def test_the_converted_folder_holds_the_files_weights(tiny_sd: Any, fresh_cache: Path) -> None:
    from autoquant.models import resolve
    from autoquant.models.single_file import inspect

    path, _folder, originals = tiny_sd
    checkpoint, config = inspect(path, None)
    assert (checkpoint.family, config.label) == ("sd", "builtin:tiny-sd")
    assert checkpoint.components == {"unet", "vae", "text_encoder"}
    spec = os.path.relpath(path)
    source = resolve(spec)
    assert (source.spec, source.kind) == (spec, "local")  # reports show what the user typed
    converted = Path(source.name)
    assert converted.parent == fresh_cache / "single-file"
    assert_same_tensors(converted_tensors(converted), originals)
    # Nothing but the pipeline is left in it: no staging folder beside it, no config folder in it.
    assert sorted(p.name for p in converted.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]
    # The built-in named as --config is the architecture detected: the same conversion.
    assert resolve(str(path), "builtin:tiny-sd").name == source.name


def test_config_folder_converts_with_that_folders_configs(tiny_sd: Any, fresh_cache: Path) -> None:
    from autoquant.models import resolve

    path, folder, originals = tiny_sd
    with_folder = Path(resolve(str(path), str(folder)).name)
    assert with_folder != Path(resolve(str(path)).name)  # another config, another conversion
    assert_same_tensors(converted_tensors(with_folder), originals)
    tokenizer = (with_folder / "tokenizer" / "tokenizer.json").read_text()
    assert tokenizer == (folder / "tokenizer" / "tokenizer.json").read_text()


def test_a_component_the_file_lacks_comes_from_the_config_folder(
    tiny_sd: Any, fresh_cache: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from autoquant.models import resolve

    path, folder, originals = tiny_sd
    without_vae = tmp_path / "no-vae.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith(VAE)}, without_vae)
    with pytest.raises(ModelNotFoundError, match=r"holds text_encoder, unet but no vae: pass"):
        resolve(str(without_vae))  # a built-in has no weights to lend
    converted = Path(resolve(str(without_vae), str(folder)).name)
    assert_same_tensors(converted_tensors(converted), originals)


def test_run_converts_once_and_plans_the_folder(
    tiny_sd: Any, fresh_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tiny_sd[0]
    args = ["-m", str(path), "--size", "64x64", "--device", "cpu"]
    assert main(["run", *args, "--steps", "2", "--out", str(tmp_path / "o"), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["model"] == str(path)
    assert f"converting SD1.x checkpoint {path} (0.02 GB) once into the cache" in err
    assert (tmp_path / "o" / "image.png").read_bytes()[:4] == b"\x89PNG"
    (converted,) = conversions(fresh_cache)
    stamp = (converted / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    # The second time the cached folder is used as it is: no conversion, the tuning cache hits.
    assert main(["run", *args, "--steps", "1", "--out", str(tmp_path / "p"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "converting" not in err and json.loads(out)["cache"]["hit"] is True
    assert main(["plan", *args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == str(path)
    assert conversions(fresh_cache) == [converted]
    assert (converted / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_load_takes_a_single_file(tiny_sd: Any, fresh_cache: Path) -> None:
    import autoquant

    path = tiny_sd[0]
    pipe = autoquant.load(
        str(path), config="builtin:tiny-sd", device="cpu", width=64, height=64, progress=False
    )
    assert pipe.autoquant_report["model"] == str(path)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_a_replaced_file_is_converted_again(
    tiny_sd: Any, fresh_cache: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from autoquant.models import resolve

    path = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_sd[0], path)
    first = Path(resolve(str(path)).name)
    assert Path(resolve(str(path)).name) == first  # the digest is remembered
    stat = path.stat()
    tensors = load_file(path)
    key = UNET + "out.2.bias"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, tmp_path / "replacement.safetensors")
    os.replace(tmp_path / "replacement.safetensors", path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, size and mtime
    assert path.stat().st_size == stat.st_size
    second = Path(resolve(str(path)).name)
    assert second != first
    unet = load_file(second / COMPONENT_WEIGHTS["unet"])
    assert float(unet["conv_out.bias"][0]) == float(tensors[key][0])


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, path)
    return path


def refused_inputs(tmp: Path, tiny: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    empty = tmp / "empty.safetensors"
    empty.write_bytes(b"")
    lora = _write_safetensors(tmp / "lora.safetensors", {"lora_unet_down.alpha": (1,)})
    # SD's layout, with a UNet no built-in has (conv_in 48 channels wide).
    odd = _write_safetensors(
        tmp / "odd.safetensors",
        {UNET + "input_blocks.0.0.weight": (48, 4, 3, 3), UNET + "out.2.weight": (4, 48, 3, 3)},
    )
    return [
        (["-m", str(tmp / "missing.safetensors")], "no such file"),
        (["-m", str(garbage)], "is not a safetensors file"),
        (["-m", str(empty)], "is not a safetensors file"),
        (["-m", str(lora)], "no checkpoint layout autoquant knows"),
        (["-m", str(odd)], "whose shapes match no built-in: pass --config"),
        (["-m", str(tiny), "--config", str(tmp / "nope")], "not a diffusers folder"),
        (["-m", str(tiny), "--config", str(garbage)], "not a diffusers folder"),
        (["-m", str(tiny), "--config", "builtin:nope"], "no built-in model 'nope'"),
        (["-m", str(tiny), "--config", "builtin:tiny-flux"], "is a FluxPipeline"),
        (["-m", "builtin:tiny-sd", "--config", "builtin:tiny-sd"], "goes with a single-file"),
    ]


@pytest.mark.parametrize("command", ["run", "plan", "serve"])
def test_bad_single_file_input_is_one_line_and_exit_2_with_nothing_written(
    tiny_sd: Any,
    fresh_cache: Path,
    tmp_path: Path,
    command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    extra = ["--out", str(out)] if command == "run" else []
    for args, expected in refused_inputs(tmp_path, tiny_sd[0]):
        started = time.perf_counter()
        assert main([command, *args, *extra]) == 2, args
        seconds = time.perf_counter() - started
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (args, err)
        assert seconds < 1.0, (args, seconds)
        assert not fresh_cache.exists() and not out.exists(), args


def test_a_bad_file_is_refused_fast_from_the_command_line(tmp_path: Path) -> None:
    lora = _write_safetensors(tmp_path / "lora.safetensors", {"lora_unet_down.alpha": (1,)})
    env = dict(os.environ, AUTOQUANT_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "autoquant", "run", "-m", str(lora)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pass --config" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "autoquant-out").exists()
    # The interpreter and the CLI's imports take most of it; the check itself is milliseconds.
    assert seconds < 3.0, seconds


def _anchor_file(path: Path, shapes: dict[str, tuple[int, ...]], blocks: dict[str, int]) -> Path:
    """A header that looks like a full-size checkpoint where detection looks: the anchor
    tensors at their real shapes (in float16, zeros) and one small tensor per numbered block."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: torch.zeros(shape, dtype=torch.float16) for name, shape in shapes.items()}
    for prefix, count in blocks.items():
        tensors.update({f"{prefix}{i}.marker": torch.zeros(1) for i in range(count)})
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("shapes", "blocks", "family", "builtin"),
    [
        (
            {UNET + "input_blocks.0.0.weight": (320, 4, 3, 3)},
            {UNET + "input_blocks.": 12, CLIP + "encoder.layers.": 12},
            "sd",
            "sd15",
        ),
        (
            {
                UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                UNET + "label_emb.0.0.weight": (1, 1),
            },
            {UNET + "input_blocks.": 9, "conditioner.embedders.1.model.transformer.resblocks.": 32},
            "sdxl",
            "sdxl",
        ),
        (
            {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)},
            {"double_blocks.": 19, "single_blocks.": 38},
            "flux",
            "flux-dev",
        ),
        (
            {
                UNET + "double_blocks.0.img_attn.norm.key_norm.scale": (32,),
                UNET + "img_in.weight": (64, 64),
            },
            {UNET + "double_blocks.": 1, UNET + "single_blocks.": 2},
            "flux",
            "tiny-flux",
        ),
    ],
)
def test_the_builtin_is_told_from_the_files_tensor_names_and_shapes(
    tmp_path: Path,
    shapes: dict[str, tuple[int, ...]],
    blocks: dict[str, int],
    family: str,
    builtin: str,
) -> None:
    from autoquant.models.single_file import matching_builtin, read_checkpoint

    checkpoint = read_checkpoint(_anchor_file(tmp_path / "big.safetensors", shapes, blocks))
    assert checkpoint.family == family and checkpoint.dtype == "float16"
    assert matching_builtin(checkpoint).label == f"builtin:{builtin}"


def test_a_transformer_only_flux_file_needs_a_config_folder_with_the_rest(
    tmp_path: Path,
) -> None:
    from autoquant.models.single_file import inspect

    flux = _anchor_file(
        tmp_path / "flux1-dev.safetensors",
        {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)},
        {"double_blocks.": 19, "single_blocks.": 38},
    )
    with pytest.raises(
        ModelNotFoundError,
        match=r"holds transformer but no text_encoder, text_encoder_2, vae: pass --config a "
        r"diffusers folder that has their safetensors weights",
    ):
        inspect(flux, None)


def test_a_file_missing_some_of_a_components_tensors_is_refused(
    tiny_sd: Any, fresh_cache: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from autoquant.models import resolve

    partial = tmp_path / "partial.safetensors"
    tensors = load_file(tiny_sd[0])
    del tensors[UNET + "out.2.bias"]
    save_file(tensors, partial)
    # diffusers leaves the tensor on the meta device and fails to cast it.
    with pytest.raises(
        ModelNotFoundError,
        match=r"partial.safetensors with builtin:tiny-sd "
        r"failed \(NotImplementedError: Cannot copy out of meta tensor.*\): if builtin:tiny-sd is "
        r"not its architecture, pass --config one that is$",
    ):
        resolve(str(partial))
    assert conversions(fresh_cache) == []  # no half-converted folder is left behind
