"""GGUF conversion of a denoiser: files diffusers loads back, the cache, and damaged cache files.

Tiny random-weight models are built here (not through autoquant.models) and saved as diffusers
folders; every Linear of the tiny UNet has in_features divisible by 32, the tiny Flux has one that
is not (x_embedder, 16).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, UNet2DConditionModel

import autoquant
from autoquant.backends.gguf import convert as gguf_convert
from autoquant.backends.gguf.convert import (
    GGUF_TYPES,
    check_gguf,
    convert_denoiser,
    denoiser_subfolder,
)
from autoquant.core.errors import AutoquantError, CacheCorruptError
from autoquant.models.identity import component_identity, model_identity

torch.set_num_threads(1)

# Relative output error against the unquantized model, per type; measured values are a few times
# lower (UNet: q8_0 0.0014, q4_0 0.027).
UNET_TOLERANCE = {"q8_0": 0.01, "q5_1": 0.05, "q5_0": 0.05, "q4_1": 0.1, "q4_0": 0.1}
FLUX_TOLERANCE = {"q8_0": 0.02, "q5_1": 0.1, "q5_0": 0.1, "q4_1": 0.2, "q4_0": 0.2}
FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def _tiny_flux(heads: int = 2, head_dim: int = 16, layers: int = 1) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6) if head_dim == 16 else (8, 12, 12),
    ).eval()


def _save_folder(
    root: Path, model: torch.nn.Module, pipeline: str, subfolder: str, **save_kwargs: Any
) -> Path:
    model.save_pretrained(root / subfolder, **save_kwargs)
    index = {"_class_name": pipeline, subfolder: ["diffusers", type(model).__name__]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _unet_forward(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 64, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor([10]), context).sample


def _flux_forward(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 16, 16, generator=generator),
            encoder_hidden_states=torch.randn(1, 4, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(4, 3),
        ).sample


def _load(path: Path, model_class: Any, folder: Path) -> Any:
    return model_class.from_single_file(
        str(path),
        config=str(folder),
        subfolder=denoiser_subfolder(folder),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
    )


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


def _quantizable_count(model: torch.nn.Module) -> int:
    return sum(
        1
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module.in_features % 32 == 0
    )


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, UNet2DConditionModel]:
    model = _tiny_unet()
    folder = _save_folder(tmp_path_factory.mktemp("sd"), model, "StableDiffusionPipeline", "unet")
    return folder, model


@pytest.fixture(scope="module")
def flux_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FluxTransformer2DModel]:
    model = _tiny_flux()
    folder = _save_folder(tmp_path_factory.mktemp("flux"), model, "FluxPipeline", "transformer")
    return folder, model


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_unet_converts_and_loads_back(
    unet_case: tuple[Path, UNet2DConditionModel], qtype: str, tmp_path: Path
) -> None:
    folder, model = unet_case
    result = convert_denoiser(folder, qtype, cache_root=tmp_path, progress=False)

    assert not result.cache_hit and not result.rebuilt
    assert result.path.parent == tmp_path
    assert result.path.name == f"{component_identity(folder, 'unet')}-{qtype}.gguf"
    assert result.file_bytes == result.path.stat().st_size
    reader = gguf.GGUFReader(result.path)
    state_dict = model.state_dict()
    assert {t.name for t in reader.tensors} == set(state_dict)
    quantized = {t.name for t in reader.tensors if t.tensor_type not in FLOAT_TYPES}
    assert len(quantized) == result.quantized_tensors == _quantizable_count(model)
    assert result.kept_tensors == len(state_dict) - result.quantized_tensors
    assert reader.get_field("autoquant.qtype").contents() == qtype  # type: ignore[union-attr]

    loaded = _load(result.path, UNet2DConditionModel, folder)
    output = _unet_forward(loaded)
    error = _relative_error(output, _unet_forward(model))
    print(f"UNet {qtype}: relative error {error:.4f}")
    assert torch.isfinite(output).all()
    assert error < UNET_TOLERANCE[qtype]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_flux_converts_and_loads_back(
    flux_case: tuple[Path, FluxTransformer2DModel], qtype: str, tmp_path: Path
) -> None:
    folder, model = flux_case
    result = convert_denoiser(folder, qtype, cache_root=tmp_path, progress=False)

    reader = gguf.GGUFReader(result.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert set(types) == set(model.state_dict())
    # in_features 16: not a whole 32-value block, so it stays F32 like the fp32 source.
    assert types["x_embedder.weight"] == gguf.GGMLQuantizationType.F32
    assert (
        types["transformer_blocks.0.attn.to_q.weight"] == gguf.GGMLQuantizationType[qtype.upper()]
    )
    assert result.quantized_tensors == _quantizable_count(model)

    output = _flux_forward(_load(result.path, FluxTransformer2DModel, folder))
    error = _relative_error(output, _flux_forward(model))
    print(f"Flux {qtype}: relative error {error:.4f}")
    assert torch.isfinite(output).all()
    assert error < FLUX_TOLERANCE[qtype]


@pytest.mark.parametrize(
    ("dtype", "kept_type"),
    [
        (torch.bfloat16, gguf.GGMLQuantizationType.F32),
        (torch.float16, gguf.GGMLQuantizationType.F16),
    ],
)
def test_half_precision_sources_keep_loadable_types(
    dtype: torch.dtype, kept_type: gguf.GGMLQuantizationType, tmp_path: Path
) -> None:
    # BF16 tensors outside nn.Linear would reach convs and norms as GGUF parameters; they are
    # widened to F32. fp16 ones stay F16, which the loader takes as plain tensors.
    model = _tiny_flux().to(dtype)
    folder = _save_folder(tmp_path / "model", model, "FluxPipeline", "transformer")
    result = convert_denoiser(folder, "q8_0", cache_root=tmp_path / "cache", progress=False)

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(result.path).tensors}
    assert types["norm_out.linear.bias"] == kept_type
    assert types["x_embedder.weight"] == kept_type
    output = _flux_forward(_load(result.path, FluxTransformer2DModel, folder))
    error = _relative_error(output, _flux_forward(model.float()))
    assert torch.isfinite(output).all()
    assert error < FLUX_TOLERANCE["q8_0"]


def test_second_call_is_a_cache_hit(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path
) -> None:
    folder, _ = unet_case
    first = convert_denoiser(folder, "q4_0", cache_root=tmp_path, progress=False)
    written_at = first.path.stat().st_mtime_ns

    second = convert_denoiser(folder, "q4_0", cache_root=tmp_path, progress=False)

    assert second.cache_hit and not second.rebuilt
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == written_at
    assert (second.quantized_tensors, second.kept_tensors, second.file_bytes) == (
        first.quantized_tensors,
        first.kept_tensors,
        first.file_bytes,
    )
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left


def test_default_cache_location_and_progress_bar(
    unet_case: tuple[Path, UNet2DConditionModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = unet_case
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path))

    result = convert_denoiser(folder, "q8_0")

    assert result.path.parent == tmp_path / "gguf"
    assert "GGUF q8_0 unet" in capsys.readouterr().err


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _overwrite_header(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"\xde\xad\xbe\xef" * 8)


def _cut_last_byte(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


@pytest.mark.parametrize("damage", [_truncate, _overwrite_header, _cut_last_byte])
def test_damaged_cache_file_is_rebuilt(
    unet_case: tuple[Path, UNet2DConditionModel],
    damage: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder, model = unet_case
    path = convert_denoiser(folder, "q8_0", cache_root=tmp_path, progress=False).path
    damage(path)
    with pytest.raises(CacheCorruptError):
        check_gguf(path)

    with caplog.at_level(logging.WARNING, logger="autoquant.backends.gguf.convert"):
        result = convert_denoiser(folder, "q8_0", cache_root=tmp_path, progress=False)

    assert result.rebuilt and not result.cache_hit
    assert any("rebuilding" in record.getMessage() for record in caplog.records)
    check_gguf(result.path, expected_tensors=len(model.state_dict()))
    output = _unet_forward(_load(result.path, UNet2DConditionModel, folder))
    assert _relative_error(output, _unet_forward(model)) < UNET_TOLERANCE["q8_0"]


def test_cache_file_of_another_type_is_rebuilt(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path
) -> None:
    folder, _ = unet_case
    q8 = convert_denoiser(folder, "q8_0", cache_root=tmp_path, progress=False).path
    q4_path = q8.with_name(q8.name.replace("q8_0", "q4_0"))
    q4_path.write_bytes(q8.read_bytes())

    result = convert_denoiser(folder, "q4_0", cache_root=tmp_path, progress=False)

    assert result.rebuilt
    types = {t.tensor_type for t in gguf.GGUFReader(result.path).tensors}
    assert gguf.GGMLQuantizationType.Q4_0 in types
    assert gguf.GGMLQuantizationType.Q8_0 not in types


def test_check_gguf_counts_tensors(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path
) -> None:
    folder, model = unet_case
    path = convert_denoiser(folder, "q4_1", cache_root=tmp_path, progress=False).path
    check_gguf(path, expected_tensors=len(model.state_dict()))
    with pytest.raises(CacheCorruptError, match="tensors"):
        check_gguf(path, expected_tensors=len(model.state_dict()) + 1)
    with pytest.raises(CacheCorruptError):
        check_gguf(tmp_path / "absent.gguf")


def test_out_path_is_written_and_never_overwritten(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path
) -> None:
    folder, _ = unet_case
    written = convert_denoiser(folder, "q5_0", out=tmp_path / "new" / "unet.gguf", progress=False)
    assert written.path == tmp_path / "new" / "unet.gguf"
    assert not written.cache_hit
    check_gguf(written.path)

    existing = tmp_path / "mine.gguf"
    existing.write_bytes(b"user data")
    with pytest.raises(AutoquantError, match="already exists"):
        convert_denoiser(folder, "q5_0", out=existing, progress=False)
    assert existing.read_bytes() == b"user data"
    with pytest.raises(AutoquantError, match=r"\.gguf"):
        convert_denoiser(folder, "q5_0", out=tmp_path / "unet.bin", progress=False)


def test_sharded_folder_converts(tmp_path: Path) -> None:
    model = _tiny_unet()
    folder = _save_folder(
        tmp_path / "sd", model, "StableDiffusionPipeline", "unet", max_shard_size="500KB"
    )
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1

    result = convert_denoiser(folder, "q8_0", cache_root=tmp_path / "cache", progress=False)

    output = _unet_forward(_load(result.path, UNet2DConditionModel, folder))
    assert _relative_error(output, _unet_forward(model)) < UNET_TOLERANCE["q8_0"]


def test_tensors_are_converted_one_at_a_time(tmp_path: Path) -> None:
    # numpy allocations are traced: a converter holding every quantized tensor would peak above
    # the sum of their sizes; streaming peaks near the largest single one (~0.5 MB here).
    model = _tiny_flux(heads=8, head_dim=32, layers=2)
    folder = _save_folder(
        tmp_path / "flux", model, "FluxPipeline", "transformer", max_shard_size="4MB"
    )
    tracemalloc.start()
    try:
        result = convert_denoiser(folder, "q8_0", cache_root=tmp_path / "cache", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    quantized_bytes = sum(
        int(t.n_bytes)
        for t in gguf.GGUFReader(result.path).tensors
        if t.tensor_type not in FLOAT_TYPES
    )
    print(f"traced peak {peak / 1e6:.2f} MB, quantized tensors {quantized_bytes / 1e6:.2f} MB")
    assert quantized_bytes > 5_000_000
    assert peak < quantized_bytes / 3


def test_denoiser_subfolder(tmp_path: Path) -> None:
    def folder_with(index: dict[str, Any]) -> Path:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps(index))
        return folder

    assert (
        denoiser_subfolder(folder_with({"unet": ["diffusers", "UNet2DConditionModel"]})) == "unet"
    )
    flux = folder_with(
        {"transformer": ["diffusers", "FluxTransformer2DModel"], "unet": [None, None]}
    )
    assert denoiser_subfolder(flux) == "transformer"
    with pytest.raises(AutoquantError, match="neither"):
        denoiser_subfolder(folder_with({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(AutoquantError, match=r"model_index\.json"):
        denoiser_subfolder(tmp_path / "missing")


def test_identity_follows_configs_and_weight_files(tmp_path: Path) -> None:
    folder = _save_folder(tmp_path / "sd", _tiny_unet(), "StableDiffusionPipeline", "unet")
    unet_id, model_id = component_identity(folder, "unet"), model_identity(folder)
    assert component_identity(folder, "unet") == unet_id
    assert len(unet_id) == 16 and int(unet_id, 16) >= 0

    (folder / "unet" / ".diffusion_pytorch_model.safetensors.tmp").write_bytes(b"partial")
    assert component_identity(folder, "unet") == unet_id  # temporary files don't count

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    touched_id = component_identity(folder, "unet")
    assert touched_id != unet_id
    assert model_identity(folder) != model_id

    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 8', '"sample_size": 16'))
    assert component_identity(folder, "unet") != touched_id

    index = json.loads((folder / "model_index.json").read_text())
    before = model_identity(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_safety_checker": 0}))
    assert model_identity(folder) != before


def test_importing_the_module_is_cheap() -> None:
    code = (
        "import sys, autoquant.backends.gguf.convert, autoquant.models.identity; "
        "heavy = {'torch', 'diffusers', 'gguf', 'numpy', 'safetensors'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_threaded_encoding_writes_the_same_bytes_as_one_thread(
    unet_case: tuple[Path, UNet2DConditionModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tensors encode on several threads but must land in plan order: the file is byte for byte
    what a single thread writes."""
    folder, _model = unet_case
    files = {}
    for threads in (1, 3):
        monkeypatch.setattr(gguf_convert, "encode_threads", lambda n=threads: n)
        files[threads] = convert_denoiser(
            folder, "q5_1", cache_root=tmp_path / str(threads), progress=False
        ).path.read_bytes()
    assert files[1] == files[3]


def _flip_middle(path: Path, count: int = 256) -> None:
    """Invert ``count`` bytes in the middle of the file: tensor data, the header untouched."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        data = handle.read(count)
        handle.seek(-len(data), os.SEEK_CUR)
        handle.write(bytes(byte ^ 0xFF for byte in data))


def test_corrupt_tensor_data_is_rebuilt(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path
) -> None:
    folder, model = unet_case
    fresh = convert_denoiser(folder, "q4_0", cache_root=tmp_path / "fresh", progress=False)
    path = convert_denoiser(folder, "q4_0", cache_root=tmp_path, progress=False).path
    assert path.read_bytes() == fresh.path.read_bytes()
    _flip_middle(path)
    gguf_convert._checked_summary(path, len(model.state_dict()), "q4_0")  # still well formed
    with pytest.raises(CacheCorruptError, match="checksum"):
        check_gguf(path)

    result = convert_denoiser(folder, "q4_0", cache_root=tmp_path, progress=False)

    assert result.rebuilt and not result.cache_hit
    assert path.read_bytes() == fresh.path.read_bytes()
    assert convert_denoiser(folder, "q4_0", cache_root=tmp_path, progress=False).cache_hit


def test_cache_file_of_another_version_is_rebuilt(
    unet_case: tuple[Path, UNet2DConditionModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder, _ = unet_case
    monkeypatch.setattr(autoquant, "__version__", "0.0.1")
    old = convert_denoiser(folder, "q8_0", cache_root=tmp_path, progress=False)
    check_gguf(old.path)  # intact: only its version differs
    monkeypatch.undo()

    with caplog.at_level(logging.WARNING, logger="autoquant.backends.gguf.convert"):
        result = convert_denoiser(folder, "q8_0", cache_root=tmp_path, progress=False)

    assert result.rebuilt and not result.cache_hit
    assert any("autoquant 0.0.1" in record.getMessage() for record in caplog.records)
    field = gguf.GGUFReader(result.path).get_field("autoquant.version")
    assert field is not None and field.contents() == autoquant.__version__


def _child_convert(folder: str, qtype: str, out: str, go: str) -> None:
    from autoquant.cli.main import main
    from tests.test_files import _start_together, slow_disk

    slow_disk()
    _start_together(Path(go))
    sys.exit(main(["convert", folder, "--to", qtype, "--out", out]))


def test_concurrent_converts_to_one_out_one_wins(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path
) -> None:
    folder, _ = unet_case
    out, go = tmp_path / "x.gguf", tmp_path / "go"
    code = (
        "import sys; from tests.test_gguf_convert import _child_convert; "
        "_child_convert(*sys.argv[1:])"
    )
    children = {
        qtype: subprocess.Popen(
            [sys.executable, "-c", code, str(folder), qtype, str(out), str(go)],
            cwd=Path(__file__).parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for qtype in ("q4_1", "q8_0")
    }
    for child in children.values():
        assert child.stdout is not None and child.stdout.readline() == "ready\n", child.stderr
    go.touch()
    outputs = {qtype: child.communicate(timeout=300) for qtype, child in children.items()}
    results = {qtype: (children[qtype].returncode, *outputs[qtype]) for qtype in children}

    [winner] = [qtype for qtype, (code, _, _) in results.items() if code == 0]
    [(loser_code, loser_out, loser_err)] = [r for qtype, r in results.items() if qtype != winner]
    assert results[winner][1].startswith("written"), results
    assert loser_code == 2 and loser_out == ""
    # One line (libraries may print their import warnings above it), no traceback.
    assert "Traceback" not in loser_err
    assert loser_err.splitlines()[-1] == (
        f"autoquant: error: {out} already exists: pick another --out (it is never overwritten)"
    )
    check_gguf(out)  # complete, and its checksum matches
    field = gguf.GGUFReader(out).get_field("autoquant.qtype")
    assert field is not None and field.contents() == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "x.gguf"]


def _fill_then_fail(error: OSError) -> Any:
    def write_gguf(path: Path, *_: Any) -> None:
        path.write_bytes(b"\0" * 4096)
        raise error

    return write_gguf


@pytest.mark.parametrize("to_out", [False, True])
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError("36864 requested and 7400 written"),  # numpy's tofile: no errno
    ],
)
def test_full_disk_is_one_line_and_leaves_nothing(
    unet_case: tuple[Path, UNet2DConditionModel],
    error: OSError,
    to_out: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, _ = unet_case
    monkeypatch.setattr(gguf_convert, "_write_gguf", _fill_then_fail(error))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    where = {"out": tmp_path / "unet.gguf"} if to_out else {"cache_root": tmp_path}

    with pytest.raises(AutoquantError, match=r"^no space left on device writing ") as caught:
        convert_denoiser(folder, "q8_0", progress=False, **where)

    message = str(caught.value)
    assert "\n" not in message and "free " in message
    assert ("--out" in message) is to_out and ("AUTOQUANT_CACHE_DIR" in message) is not to_out
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_a_short_write_with_room_left_is_not_called_a_full_disk(
    unet_case: tuple[Path, UNet2DConditionModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = unet_case
    error = OSError("36864 requested and 7400 written")
    monkeypatch.setattr(gguf_convert, "_write_gguf", _fill_then_fail(error))

    with pytest.raises(OSError, match="requested") as caught:
        convert_denoiser(folder, "q8_0", cache_root=tmp_path, progress=False)

    assert not isinstance(caught.value, AutoquantError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_out_file_mode_follows_the_umask(
    unet_case: tuple[Path, UNet2DConditionModel], mask: int, mode: int, tmp_path: Path
) -> None:
    folder, _ = unet_case
    previous = os.umask(mask)
    try:
        result = convert_denoiser(folder, "q4_0", out=tmp_path / "unet.gguf", progress=False)
    finally:
        os.umask(previous)
    assert result.path.stat().st_mode & 0o777 == mode
