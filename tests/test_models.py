"""Models: resolving specs, parameter counts on the meta device, and built-in folders that load
and run like any diffusers folder."""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from autoquant.backends.gguf.formats import GGUF_BLOCK
from autoquant.core.errors import ModelNotFoundError
from autoquant.models import builtin_names, inventory, list_builtins, materialize, resolve
from autoquant.models.builtin import load_builtin
from autoquant.models.components import counted_components
from autoquant.models.hub import hub_unreachable_reason
from autoquant.models.inventory import build_on_meta
from autoquant.models.tokenizers import CLIP_EOS_ID
from autoquant.models.types import ModelInventory

torch.set_num_threads(1)

TINY = ["tiny-sd", "tiny-flux"]
CLIP_L = 123_060_480
CLIP_BIG_G = 694_659_840
SD_VAE = 83_653_863
FLUX_VAE = 83_819_683
T5_XXL = 4_762_310_656
# name -> component -> (params, nn.Linear weights); every Linear of these has in_features % 32 == 0
FULL_SIZE_COUNTS = {
    "sd15": {
        "unet": (859_520_964, 270_049_280),
        "text_encoder": (CLIP_L, 84_934_656),
        "vae": (SD_VAE, 2_097_152),
    },
    "sdxl": {
        "unet": (2_567_463_684, 2_232_647_680),
        "text_encoder": (CLIP_L, 84_934_656),
        "text_encoder_2": (CLIP_BIG_G, 630_784_000),
        "vae": (SD_VAE, 2_097_152),
    },
    "flux-dev": {
        "transformer": (11_901_408_320, 11_898_322_944),
        "text_encoder": (CLIP_L, 84_934_656),
        "text_encoder_2": (T5_XXL, 4_630_511_616),
        "vae": (FLUX_VAE, 2_097_152),
    },
}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Each tiny built-in materialized once for the module, in its own cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("shared-cache")))
        yield {name: materialize(resolve(f"builtin:{name}"), progress=False) for name in TINY}


def _generate(folder: Path, prompt: str = "a photo of a cat") -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(result.images)


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*/*.safetensors")):
        for key, tensor in load_file(path).items():
            tensors[f"{path.parent.name}/{key}"] = tensor
    return tensors


def _counts(inv: ModelInventory) -> dict[str, Any]:
    return {k: v for k, v in inv.to_dict().items() if k != "model"}


# --- resolve -------------------------------------------------------------------------------------


def test_resolve_builtin() -> None:
    source = resolve("builtin:tiny-sd")
    assert (source.kind, source.name, source.spec) == ("builtin", "tiny-sd", "builtin:tiny-sd")
    assert builtin_names() == ["flux-dev", "sd15", "sdxl", "tiny-flux", "tiny-sd"]


def test_resolve_unknown_builtin_lists_the_builtins() -> None:
    with pytest.raises(ModelNotFoundError) as error:
        resolve("builtin:tiny-sdxl")
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message for name in builtin_names())


def test_resolve_missing_folder(tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nope"), "./nope", "~/nope", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="no such folder"):
            resolve(spec)
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve("model.safetensors")


def test_resolve_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no model_index\.json"):
        resolve(str(tmp_path))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"weights\.safetensors is not a safetensors file"):
        resolve(str(tmp_path / "weights.safetensors"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.BIN", "unet.pt", "vae.pth"])
def test_a_pickled_checkpoint_is_refused_before_anything_reads_it(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoquant.cli.main import main

    checkpoint = tmp_path / name
    checkpoint.write_bytes(b"not to be unpickled")
    with pytest.raises(ModelNotFoundError, match=r"pickled checkpoint.*only safetensors"):
        resolve(str(checkpoint))
    assert main(["plan", "-m", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "pickled checkpoint" in err and err.count("\n") == 1
    assert checkpoint.read_bytes() == b"not to be unpickled"


def test_resolve_hub_id_and_bare_words() -> None:
    source = resolve("black-forest-labs/FLUX.1-dev")
    assert (source.kind, source.name) == ("hub", "black-forest-labs/FLUX.1-dev")
    with pytest.raises(ModelNotFoundError, match=r"did you mean builtin:sdxl\?"):
        resolve("sdxl")
    with pytest.raises(ModelNotFoundError):
        resolve("")


def test_resolve_local_folder(tiny_folders: dict[str, Path]) -> None:
    source = resolve(str(tiny_folders["tiny-sd"]))
    assert source.kind == "local"
    assert source.local_path == tiny_folders["tiny-sd"]
    assert materialize(source) == tiny_folders["tiny-sd"]


def test_import_is_cheap() -> None:
    code = "import sys, autoquant.models; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- built-in folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_loads_runs_and_reloads_identically(
    name: str, tiny_folders: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    folder = tiny_folders[name]
    assert folder.name.startswith(f"{name}-")
    image = _generate(folder)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05  # not a flat image
    assert np.array_equal(image, _generate(folder))

    resaved = tmp_path / "resaved"
    DiffusionPipeline.from_pretrained(folder).save_pretrained(resaved)
    assert np.array_equal(image, _generate(resaved))
    # The prompt reaches the denoiser through the offline tokenizers.
    assert not np.array_equal(image, _generate(folder, "a red dog on the grass"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_weights_are_deterministic(
    name: str, tiny_folders: dict[str, Path], cache: Path
) -> None:
    again = materialize(resolve(f"builtin:{name}"), progress=False)
    assert again.parent.parent == cache  # a different cache dir than the shared one
    assert again.name == tiny_folders[name].name
    first, second = _load_weights(tiny_folders[name]), _load_weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert all(t.dtype == torch.float32 for t in first.values())


def test_materialize_builds_once_and_reports_progress(capsys: pytest.CaptureFixture[str]) -> None:
    source = resolve("builtin:tiny-sd")
    folder = materialize(source)
    assert "building tiny-sd: unet (3.2 M params)… " in capsys.readouterr().err
    assert materialize(source) == folder
    assert capsys.readouterr().err == ""  # nothing built again


def test_failed_build_leaves_no_folder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk full")

    # The package's `materialize` attribute is the function; the module is reached by import.
    module = importlib.import_module("autoquant.models.materialize")
    monkeypatch.setattr(module, "build_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        materialize(resolve("builtin:tiny-sd"), progress=False)
    assert list((cache / "models").iterdir()) == []


@pytest.mark.parametrize("name", TINY)
def test_tokenizers_fit_their_text_encoders(name: str, tiny_folders: dict[str, Path]) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_folders[name])
    ids = pipe.tokenizer("A photo of a cat!").input_ids
    assert ids[-1] == CLIP_EOS_ID == pipe.text_encoder.config.eos_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size
    assert len(set(ids)) > 5  # one token per character, not everything unknown
    if name == "tiny-flux":
        assert type(pipe.tokenizer_2).__name__ == "T5Tokenizer"  # T5TokenizerFast in transformers 5
        t5_ids = pipe.tokenizer_2("A photo of a cat!").input_ids
        assert t5_ids[-1] == pipe.tokenizer_2.eos_token_id
        assert pipe.tokenizer_2.unk_token_id not in t5_ids
        assert max(t5_ids) < pipe.text_encoder_2.config.vocab_size
        assert pipe.tokenizer_2.model_max_length == 512


@pytest.mark.parametrize("name", TINY)
def test_tiny_linears_suit_gguf_and_bitsandbytes_on_cpu(name: str) -> None:
    # GGUF needs in_features % 32 == 0; bitsandbytes on CPU needs % 64.
    spec = load_builtin(name)
    for component, (library, class_name) in counted_components(spec.model_index).items():
        model = build_on_meta(library, class_name, spec.components[component])
        widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
        assert widths and all(w % 64 == 0 for w in widths), (component, sorted(widths))


# --- inventory -----------------------------------------------------------------------------------


def test_full_size_counts_on_meta_without_ram() -> None:
    import diffusers
    import transformers

    # Import the model classes first: their modules are part of the process, not of the count.
    for library, names in (
        (diffusers, ("UNet2DConditionModel", "FluxTransformer2DModel", "AutoencoderKL")),
        (transformers, ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")),
    ):
        for class_name in names:
            getattr(library, class_name)
    rss_before = psutil.Process().memory_info().rss
    inventories = {name: inventory(resolve(f"builtin:{name}")) for name in FULL_SIZE_COUNTS}
    assert psutil.Process().memory_info().rss - rss_before < 500 * 2**20

    for name, expected in FULL_SIZE_COUNTS.items():
        inv = inventories[name]
        got = {c.name: (c.params, c.linear_params) for c in inv.components}
        assert got == expected, name
        assert all(c.linear_params_in_blocks(GGUF_BLOCK) == c.linear_params for c in inv.components)
    sdxl_unet = inventories["sdxl"].denoiser
    assert sdxl_unet.other_params == pytest.approx(0.333e9, rel=0.01)  # convs, norms, biases
    flux = inventories["flux-dev"]
    assert flux.denoiser.linear_params / flux.denoiser.params > 0.999
    # T5's _keep_in_fp32_modules = ["wo"]: 24 blocks of a 10240 -> 4096 projection, which
    # bitsandbytes and quanto leave unquantized. No diffusers model here keeps any.
    kept = {c.name: c.kept_linear_params for c in flux.components}
    assert kept == {
        "text_encoder": 0,
        "text_encoder_2": 24 * 10240 * 4096,
        "transformer": 0,
        "vae": 0,
    }
    assert [(i.family, i.default_size, i.vae_scale_factor) for i in inventories.values()] == [
        ("sd", 512, 8),
        ("sdxl", 1024, 8),
        ("flux", 1024, 8),
    ]


def test_inventory_is_cached_and_survives_a_corrupt_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The package rebinds the name `inventory` to the function: reach the module itself.
    counting = importlib.import_module("autoquant.models.inventory")

    source = resolve("builtin:flux-dev")
    first = inventory(source)
    real_count = counting._count

    def must_not_count(*args: Any) -> Any:
        raise AssertionError("counted again although the counts are cached")

    monkeypatch.setattr(counting, "_count", must_not_count)
    assert inventory(source) == first
    monkeypatch.setattr(counting, "_count", real_count)
    (cached,) = (cache / "inventory").glob("*.json")
    cached.write_text('{"family": ')
    assert inventory(source) == first
    assert json.loads(cached.read_text())["pipeline_class"] == "FluxPipeline"


def test_folder_inventory_equals_builtin_inventory(tiny_folders: dict[str, Path]) -> None:
    builtin = inventory(resolve("builtin:tiny-sd"))
    folder = inventory(resolve(str(tiny_folders["tiny-sd"])))
    assert _counts(folder) == _counts(builtin)
    assert (builtin.family, builtin.default_size) == ("sd", 64)
    assert [c.name for c in builtin.components] == ["text_encoder", "unet", "vae"]


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}


@pytest.mark.parametrize(
    ("index", "unet_config", "expected"),
    [
        ("{not json", None, r"model_index\.json is not valid JSON \(Expecting"),
        ("[1, 2]", None, r"model_index\.json must hold a JSON object \{\.\.\.\}, not \[1, 2\]"),
        ('{"unet": ["diffusers", "UNet2DConditionModel"]}', None, r'no "_class_name"'),
        (
            json.dumps({**SD_INDEX, "unet": ["diffusers", "UNet2DConditionModel", "extra"]}),
            None,
            r"'unet' must be \[library, class name\] or \[null, null\]",
        ),
        (json.dumps(SD_INDEX), "{garbage", r"unet/config\.json is not valid JSON"),
        (json.dumps(SD_INDEX), "[]", r"unet/config\.json must hold a JSON object"),
        (json.dumps(SD_INDEX), "\xff\xfe", r"cannot read .*unet/config\.json"),
    ],
)
def test_a_broken_folder_is_a_one_line_model_error(
    tmp_path: Path, index: str, unet_config: str | None, expected: str
) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    if unet_config is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_bytes(unet_config.encode("latin-1"))
    with pytest.raises(ModelNotFoundError, match=expected) as error:
        inventory(resolve(str(folder)))
    assert "\n" not in str(error.value)


def test_a_config_that_does_not_build_its_class_is_a_model_error(
    tiny_folders: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-sd"
    shutil.copytree(tiny_folders["tiny-sd"], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "block_out_channels": [32]}))
    with pytest.raises(ModelNotFoundError, match=r"'unet': diffusers\.UNet2DConditionModel cannot"):
        inventory(resolve(str(folder)))


def test_list_builtins() -> None:
    listing = {entry["name"]: entry for entry in list_builtins()}
    assert list(listing) == builtin_names()
    assert listing["tiny-flux"]["pipeline_class"] == "FluxPipeline"
    assert listing["tiny-flux"]["default_size"] == 64
    assert listing["sdxl"]["family"] == "sdxl"
    unet = next(c for c in listing["sdxl"]["components"] if c["name"] == "unet")
    assert unet["params"] == 2_567_463_684


# --- hub -----------------------------------------------------------------------------------------


def test_hub_offline_fails_fast() -> None:
    with pytest.raises(ModelNotFoundError, match="cannot reach the Hugging Face hub") as error:
        materialize(resolve("org/name"))
    assert "'org/name'" in str(error.value) and "builtin:" in str(error.value)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        inventory(resolve("org/name"))


def test_hub_unreachable_by_socket_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelNotFoundError, match=r"cannot reach .*127\.0\.0\.1:9"):
        materialize(resolve("org/name"))

    def never_answers(*args: object, **kwargs: object) -> None:
        time.sleep(2)
        raise TimeoutError("timed out")  # what a real connect does once it gives up

    # A host that never answers (DNS lookup included) is given up on at the timeout: that
    # message comes only from the wait running out while the connect still sleeps.
    monkeypatch.setattr(socket, "create_connection", never_answers)
    assert hub_unreachable_reason(timeout_s=0.3) == "127.0.0.1:9 did not answer within 0.3 s"


@pytest.mark.parametrize(
    ("files", "variant"),
    [
        ({"unet": ["diffusion_pytorch_model.safetensors"]}, None),
        (
            {"unet": ["diffusion_pytorch_model.fp16.safetensors"], "vae": ["x.fp16.safetensors"]},
            "fp16",
        ),
        (
            {
                "unet": [
                    "diffusion_pytorch_model.safetensors.index.fp16.json",
                    "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                    "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                ]
            },
            "fp16",
        ),
        # Standard weights beside a variant: the standard ones load, as diffusers' default.
        (
            {
                "unet": [
                    "diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.fp16.safetensors",
                ]
            },
            None,
        ),
        ({"unet": ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]}, None),
        ({"unet": ["config.json"]}, None),  # nothing to tell
    ],
)
def test_the_only_weights_variant_is_found(
    tmp_path: Path, files: dict[str, list[str]], variant: str | None
) -> None:
    from autoquant.models.variant import weights_variant

    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "X"]}
    for component, names in files.items():
        index[component] = ["diffusers", "Model"]
        (tmp_path / component).mkdir()
        for name in names:
            (tmp_path / component / name).write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert weights_variant(tmp_path) == variant


def test_components_shipping_different_variants_only_are_one_clear_error(tmp_path: Path) -> None:
    from autoquant.models.variant import weights_variant

    for component, variant in (("unet", "fp16"), ("vae", "bf16")):
        (tmp_path / component).mkdir()
        (tmp_path / component / f"diffusion_pytorch_model.{variant}.safetensors").write_text("")
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match=r"several \(bf16, fp16\)"):
        weights_variant(tmp_path)
