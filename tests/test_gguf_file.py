"""The user's own GGUF file as the denoiser's weights (--gguf): a K-quant file, written here by a
test-local encoder (gguf-py writes no K-quants), read at plan time from its header, run on the
CPU with its weights, and every wrong file refused in one line.

The model is builtin:tiny-flux with a wider transformer (inner width 256): K-quant blocks are 256
weights wide, so only Linear layers whose in_features is a multiple of 256 can be K-quants; the
others stay F32 in the file, as city96's files keep them F16/F32.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from gguf import GGMLQuantizationType as GgmlType
from test_cli import aq

from autoquant.backends import backend_class
from autoquant.backends.gguf.formats import K_BLOCK, K_BLOCK_BYTES
from autoquant.backends.gguf.user_file import read_gguf_file
from autoquant.backends.tier import DTYPE_BYTES
from autoquant.cli.main import main
from autoquant.execute.tuning import TuneOptions, make_plan, tune
from autoquant.models import materialize, resolve

# --- a K-quant encoder (min-max scales; ggml's block layouts as gguf-py's quants.py reads them) --


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _pack_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins of a super-block in 12 bytes (Q4_K.get_scale_min's layout)."""
    out = np.zeros((scales.shape[0], 12), np.uint8)
    out[:, 0:4] = (scales[:, 0:4] & 0x3F) | ((scales[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mins[:, 0:4] & 0x3F) | ((mins[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (scales[:, 4:8] & 0x0F) | ((mins[:, 4:8] & 0x0F) << 4)
    return out


def _affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Each 32-weight sub-block of x (n, 8, 32) as d*scale*q - dmin*min, q in 0..levels."""
    floor = -np.minimum(x.min(axis=-1), 0.0)  # stored as a subtracted, non-negative min
    scale = (x.max(axis=-1) + floor) / levels
    d = _f16(scale.max(axis=-1) / 63).astype(np.float32)
    dmin = _f16(floor.max(axis=-1) / 63).astype(np.float32)
    scales = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    mins = np.clip(np.round(floor / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * scales)[..., None]
    offset = (dmin[:, None] * mins)[..., None]
    q = np.clip(np.round((x + offset) / np.where(step > 0, step, 1)), 0, levels)
    return d, dmin, scales, mins, q.astype(np.uint8)


def _head(d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    return np.stack([_f16(d), _f16(dmin)], axis=-1).view(np.uint8).reshape(-1, 4)


def encode_q4_k(rows: np.ndarray) -> np.ndarray:
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, scales, mins, q = _affine(x, 15)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_head(d, dmin), _pack_scales(scales, mins), qs], axis=-1)


def encode_q5_k(rows: np.ndarray) -> np.ndarray:
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, scales, mins, q = _affine(x, 31)
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    for sub in range(8):  # bit 4 of sub-block `sub` is bit `sub` of qh
        qh |= (q[:, sub] >> 4) << sub
    return np.concatenate([_head(d, dmin), _pack_scales(scales, mins), qh, qs], axis=-1)


def encode_q6_k(rows: np.ndarray) -> np.ndarray:
    x = rows.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1) / 127).astype(np.float32)
    scales = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), 0, 127).astype(np.int8)
    step = (d[:, None] * scales)[..., None]
    q = np.clip(np.round(x / np.where(step > 0, step, 1)), -32, 31).astype(np.int16) + 32
    halves = q.astype(np.uint8).reshape(-1, 2, 128)
    ql = np.zeros((x.shape[0], 2, 64), np.uint8)
    qh = np.zeros((x.shape[0], 2, 32), np.uint8)
    for part in range(2):  # low nibbles: values 0-63 of a half, then 64-127 shifted by 4
        ql |= (halves[:, :, part * 64 : (part + 1) * 64] & 0x0F) << (4 * part)
    for part in range(4):  # high two bits: four runs of 32 values
        qh |= (halves[:, :, part * 32 : (part + 1) * 32] >> 4) << (2 * part)
    return np.concatenate(
        [
            ql.reshape(-1, 128),
            qh.reshape(-1, 64),
            scales.view(np.uint8),
            _f16(d[:, None]).view(np.uint8),
        ],
        axis=-1,
    )


ENCODERS = {GgmlType.Q4_K: encode_q4_k, GgmlType.Q5_K: encode_q5_k, GgmlType.Q6_K: encode_q6_k}


def encode(weight: np.ndarray, qtype: GgmlType) -> np.ndarray:
    """A 2-D weight as the bytes of its rows' blocks: (rows, bytes per row)."""
    blocks = ENCODERS[qtype](weight.reshape(-1, K_BLOCK))
    return blocks.reshape(weight.shape[0], -1)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, GgmlType]]) -> None:
    """A GGUF file of ``tensors``: name → (values, or encoded bytes for a quantized type; type)."""
    writer = gguf.GGUFWriter(path=None, arch="flux")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized(path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type))


# --- the model and its file ---------------------------------------------------------------------

# What the tiny Flux's text encoders and VAE need of the transformer; wide enough for K-quants.
WIDE_FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


def _quantized_type(name: str, module: torch.nn.Module) -> GgmlType | None:
    """The file's type of a weight: Q6_K for the feed-forward outputs, Q4_K for every other
    Linear a 256-block fits, None (F32) for the rest."""
    if not isinstance(module, torch.nn.Linear) or module.in_features % K_BLOCK:
        return None
    return GgmlType.Q6_K if name.endswith("ff.net.2") else GgmlType.Q4_K


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny-flux folder with the wide transformer, and its K-quant GGUF file."""
    root = tmp_path_factory.mktemp("gguf-file")
    folder = root / "wide-flux"
    shutil.copytree(materialize(resolve("builtin:tiny-flux"), progress=False), folder)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**WIDE_FLUX).eval()
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    modules = dict(model.named_modules())
    tensors: dict[str, tuple[np.ndarray, GgmlType]] = {}
    for name, value in model.state_dict().items():
        array = value.float().numpy()
        qtype = _quantized_type(name[: -len(".weight")], modules.get(name[: -len(".weight")]))
        if name.endswith(".weight") and qtype is not None:
            tensors[name] = (encode(array, qtype), qtype)
        else:
            tensors[name] = (array, GgmlType.F32)
    path = root / "wide-flux-Q4_K.gguf"
    write_gguf(path, tensors)
    return folder, path


def _linear_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {
        f"{name}.weight": module.weight.detach().float().numpy()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.in_features % K_BLOCK == 0
    }


# --- the encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qtype", "tolerance"), [(GgmlType.Q4_K, 0.12), (GgmlType.Q5_K, 0.06), (GgmlType.Q6_K, 0.03)]
)
def test_the_encoder_writes_blocks_gguf_py_reads_back(qtype: GgmlType, tolerance: float) -> None:
    weight = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32) * 0.02
    raw = encode(weight, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.shape == (64, 512 // block * size)
    back = gguf.quants.dequantize(raw, qtype)
    error = np.linalg.norm(back - weight) / np.linalg.norm(weight)
    # Measured: q4_k 0.078, q5_k 0.038, q6_k 0.020 (the backend's declared layer errors).
    assert error < tolerance


def test_k_quant_bytes_are_gguf_pys() -> None:
    backend = backend_class("gguf")
    for name, size in K_BLOCK_BYTES.items():
        assert gguf.GGML_QUANT_SIZES[GgmlType[name.upper()]] == (K_BLOCK, size)
        fmt = backend.format(name)
        assert fmt is not None and fmt.block == K_BLOCK and fmt.linear_bytes == size / K_BLOCK
    # Classed by the measured errors: q6_k with q8_0 in the int8 class, q5_k with q5_1.
    assert backend.layer_error("q6_k") < 3.2e-2 < backend.layer_error("q5_k")
    assert "q4_k" not in backend.precisions  # never converted to, never in the plan space


# --- planning -----------------------------------------------------------------------------------


def test_plan_reads_the_files_type_bytes_and_class(wide_flux: tuple[Path, Path]) -> None:
    folder, path = wide_flux
    weights = read_gguf_file(path)
    assert weights.precision == "q4_k"
    assert weights.types["q4_k"] > weights.types["q6_k"] > 0
    assert weights.tensor_bytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    the_plan, _, inventory = make_plan(
        TuneOptions(model=str(folder), gguf=str(path), device="cpu", progress=False)
    )
    chosen = the_plan.chosen
    assert (chosen.tier.backend, chosen.tier.precision) == ("gguf", "q4_k")
    assert chosen.fidelity == "4bit"
    assert all((p.tier.backend, p.tier.precision) == ("gguf", "q4_k") for p in the_plan.ladder)
    assert the_plan.settings["force"]["gguf"] == str(path.resolve())
    assert any(str(path.resolve()) in line for line in the_plan.path)
    # The denoiser's bytes: the file's quantized tensors as they are, its F32 ones at the compute
    # dtype they are loaded in, plus the allocator's 1%; but its q6_k weights count at q4_k's
    # size: the estimate prices the tier's type from the formats table, not each tensor's type.
    loaded = 0
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type == GgmlType.F32:
            loaded += tensor.n_elements * DTYPE_BYTES[chosen.tier.compute_dtype]
        else:
            loaded += tensor.n_elements * K_BLOCK_BYTES["q4_k"] // K_BLOCK
    planned = chosen.estimate.components[inventory.denoiser.name]
    assert abs(planned - loaded * 1.01) < 0.002 * loaded


# --- running ------------------------------------------------------------------------------------


def test_run_uses_the_files_weights(wide_flux: tuple[Path, Path], tmp_path: Path) -> None:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    folder, path = wide_flux
    result = tune(
        TuneOptions(
            model=str(folder),
            gguf=str(path),
            device="cpu",
            width=64,
            height=64,
            smoke_steps=2,
            progress=False,
            use_cache=False,
        )
    )
    transformer = result.pipeline.transformer
    seen = set()
    for name, module in transformer.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_type", None) is None:
            continue
        key = f"{name}.weight"
        loaded = dequantize_gguf_tensor(weight).float().numpy()
        # Dequantized in bf16 by diffusers: equal to gguf-py's float32 dequantization of the
        # file to bf16's precision (q4_k itself is ~8% off the model's own weights).
        expected = dequantized(path, key).reshape(loaded.shape)
        np.testing.assert_allclose(
            loaded, expected, rtol=2**-7, atol=2**-7 * np.abs(expected).max()
        )
        seen.add(weight.quant_type)
    assert seen == {GgmlType.Q4_K, GgmlType.Q6_K}


def test_cli_run_reports_the_file(wide_flux: tuple[Path, Path], tmp_path: Path) -> None:
    folder, path = wide_flux
    out = tmp_path / "out"
    proc = aq(
        "run",
        "-m",
        str(folder),
        "--gguf",
        str(path),
        "--device",
        "cpu",
        "--size",
        "64x64",
        "--steps",
        "2",
        "--smoke-steps",
        "1",
        "--out",
        str(out),
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["chosen"]["backend"], report["chosen"]["precision"]) == ("gguf", "q4_k")
    assert report["plan"]["settings"]["force"]["gguf"] == str(path.resolve())
    assert str(path.resolve()) in (out / "report.md").read_text()


# --- refusals -----------------------------------------------------------------------------------


def _fake(path: Path, tensors: dict[str, tuple[tuple[int, ...], GgmlType]]) -> Path:
    """A GGUF file holding zeros of these shapes and types: enough for the header checks."""
    contents: dict[str, tuple[np.ndarray, GgmlType]] = {}
    for name, (shape, qtype) in tensors.items():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if qtype == GgmlType.F32:
            contents[name] = (np.zeros(shape, np.float32), qtype)
        else:
            contents[name] = (np.zeros((*shape[:-1], shape[-1] // block * size), np.uint8), qtype)
    write_gguf(path, contents)
    return path


def _unet_file(tmp: Path) -> Path:
    return _fake(
        tmp / "unet.gguf",
        {
            "conv_in.weight": ((32, 4, 3, 3), GgmlType.F32),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (
                (32, 256),
                GgmlType.Q4_K,
            ),
        },
    )


def _narrow_flux_file(tmp: Path) -> Path:
    return _fake(
        tmp / "narrow.gguf",
        {
            "x_embedder.weight": ((128, 64), GgmlType.F32),
            "single_transformer_blocks.0.proj_mlp.weight": ((512, 256), GgmlType.Q4_K),
        },
    )


def _odd_type_file(tmp: Path) -> Path:
    return _fake(tmp / "odd.gguf", {"x_embedder.weight": ((256, 256), GgmlType.TQ1_0)})


def _not_gguf(tmp: Path) -> Path:
    path = tmp / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    return path


REFUSED: list[tuple[str, Any, list[str], str]] = [
    ("missing", lambda tmp: tmp / "nowhere.gguf", [], "no such file"),
    ("a folder", lambda tmp: tmp, [], "not a file"),
    ("bad magic", _not_gguf, [], "not a GGUF file"),
    ("unet for flux", _unet_file, [], "holds an SD/SDXL UNet, but the model's denoiser is a Flux"),
    ("narrow flux", _narrow_flux_file, [], "x_embedder.weight is 128x64 where its config"),
    ("tq1_0", _odd_type_file, [], "tq1_0, which diffusers 0.42.1 cannot load"),
    ("other backend", _narrow_flux_file, ["--backend", "quanto"], "drop --backend quanto"),
    ("other precision", _narrow_flux_file, ["--precision", "q8_0"], "is q4_k, not q8_0"),
]


@pytest.mark.parametrize(
    ("make", "extra", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
@pytest.mark.parametrize("command", ["plan", "run"])
def test_wrong_files_are_one_line_and_exit_2(
    wide_flux: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    make: Any,
    extra: list[str],
    expected: str,
) -> None:
    folder, _ = wide_flux
    bad = make(tmp_path)
    out = tmp_path / "out"
    args = [command, "-m", str(folder), "--gguf", str(bad), *extra]
    if command == "run":
        args += ["--out", str(out)]
    capsys.readouterr()
    started = time.perf_counter()
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert seconds < 1.0
    assert not out.exists()
