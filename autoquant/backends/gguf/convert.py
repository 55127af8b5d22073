"""Convert a diffusers denoiser (UNet or transformer) into a GGUF file that diffusers can load.

diffusers only loads GGUF files that someone already quantized; this module writes them from a
local diffusers folder, tensor by tensor: memory holds one tensor and its float32 copy per
encoding thread (about 0.3 GB each for Flux-sized layers), whatever the size of the model.

What diffusers 0.42's loader requires (``load_gguf_checkpoint`` in models/model_loading_utils.py,
``from_single_file`` in loaders/single_file_model.py, quantizers/gguf/), and so what is written:

- The file name must end in ``.gguf``: the loader picks the GGUF reader by extension.
- The tensor names must equal the model's ``state_dict`` keys exactly; any difference sends the
  checkpoint through the original-checkpoint (LDM) key converter, which fails on diffusers names.
- F32 and F16 tensors load as plain tensors. Every other type, BF16 included, becomes a
  GGUFParameter that only the GGUFLinear replacing an ``nn.Linear`` can use. So only nn.Linear
  weights are quantized, and only those whose rows (in_features) are a multiple of the 32-value
  block; every other tensor is F16 when stored as fp16 and F32 otherwise (bf16 → F32 is exact,
  bf16 → F16 would flush small weights).
- Linear layers inside the class's ``_keep_in_fp32_modules`` stay unquantized: the loader would
  dequantize them again anyway.
- No metadata is read. ``general.architecture`` (GGUFWriter always writes it) holds the diffusers
  class name; ``autoquant.version``, ``autoquant.qtype`` and ``autoquant.source`` (the component
  identity) say where the file came from, and ``autoquant.sha256`` is the checksum of every other
  byte of the file, written last (``_seal``): a cached file is reused only when it matches and the
  version is this one's.

Load the result with ``ModelClass.from_single_file(str(path), config=str(folder),
subfolder=subfolder, quantization_config=GGUFQuantizationConfig(compute_dtype=...))``.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import autoquant
from autoquant.backends.gguf.formats import GGUF_BLOCK, GGUF_TYPES
from autoquant.core.errors import AutoquantError, CacheCorruptError, ModelNotFoundError
from autoquant.core.fsutil import atomic_path
from autoquant.core.paths import cache_dir
from autoquant.core.units import format_bytes
from autoquant.models.identity import component_identity

if TYPE_CHECKING:
    import numpy as np
    import torch

_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Floating dtypes as safetensors names them, with their size in bytes. Integer tensors cannot be
# stored: the loader would take any type but F32/F16 for a quantized one.
_FLOAT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_KEY_VERSION = "autoquant.version"
_KEY_QTYPE = "autoquant.qtype"
_KEY_SOURCE = "autoquant.source"
_KEY_DIGEST = "autoquant.sha256"
# What the digest's place holds while the digest is computed, and is read as when checking it.
_DIGEST_PLACEHOLDER = b"0" * 64
# The digest is the sha256 of the sha256s of the file's segments, which hash in parallel; the
# segment size is part of the digest's definition, the thread count is not.
_DIGEST_SEGMENT = 64 * 2**20
# Read at a time by each thread: hashing holds 128 KiB a thread whatever the file's size.
_DIGEST_READ = 2**17
# gguf's quantizers are numpy, which releases the GIL inside its array operations, so threads
# encode several tensors at once. Flux-dev's transformer to Q5_1 on a 16-core host: 215 s on one
# thread; on eight, its whole load (conversion included) took 102 s. More threads than this
# mostly add memory (a tensor each).
_MAX_ENCODE_THREADS = 8

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_denoiser` produced."""

    path: Path
    cache_hit: bool  # a valid cached file was reused; nothing was written
    rebuilt: bool  # a cached file failed its check and was written anew
    quantized_tensors: int
    kept_tensors: int  # stored as F16/F32
    file_bytes: int
    seconds: float


@dataclass(frozen=True)
class _SourceTensor:
    name: str
    shard: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "F16", "BF16", ...

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * _FLOAT_ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class _PlannedTensor:
    source: _SourceTensor
    ggml_type: Any  # gguf.GGMLQuantizationType (gguf is imported only when converting)

    @property
    def quantized(self) -> bool:
        return not _is_float_type(self.ggml_type)

    @property
    def nbytes(self) -> int:
        """Its size in the GGUF file."""
        import gguf

        block_size, type_size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        element_count = self.source.nbytes // _FLOAT_ITEMSIZE[self.source.dtype]
        return element_count // block_size * type_size


@dataclass(frozen=True)
class _ModelScan:
    """What the denoiser class itself says, from an instance built on the meta device."""

    class_name: str
    state_dict_keys: frozenset[str]
    quantizable_weights: frozenset[str]  # nn.Linear weights outside _keep_in_fp32_modules


@dataclass(frozen=True)
class _GgufSummary:
    tensor_count: int
    quantized_tensors: int
    # The autoquant.* metadata; None in files autoquant did not write.
    qtype: str | None
    version: str | None
    digest: str | None
    digest_offset: int  # where the digest's characters start in the file (-1: none)


def denoiser_subfolder(folder: Path) -> str:
    """The folder of the pipeline's denoiser: "transformer" or "unet", as model_index.json lists."""
    model_index = folder / "model_index.json"
    if not model_index.is_file():
        raise ModelNotFoundError(f"{folder} is not a diffusers model folder: no model_index.json")
    index = json.loads(model_index.read_text(encoding="utf-8"))
    for name in ("transformer", "unet"):
        entry = index.get(name)
        if isinstance(entry, list) and entry and entry[0] is not None:
            return name
    raise AutoquantError(
        f"{model_index} lists neither a 'transformer' nor a 'unet' component; "
        "only pipelines with one of them can be converted to GGUF"
    )


def convert_denoiser(
    folder: Path,
    qtype: str,
    *,
    out: Path | None = None,
    cache_root: Path | None = None,
    progress: bool = True,
) -> ConvertResult:
    """Write the denoiser of the diffusers folder ``folder`` as a GGUF file quantized to ``qtype``.

    With ``out`` the file goes there (which must not exist yet). Otherwise it goes to the cache,
    ``(cache_root or cache_dir()/"gguf") / "<component identity>-<qtype>.gguf"``, and a valid file
    already there is reused; a damaged one is rebuilt with a warning. ``progress`` shows a bar on
    stderr.
    """
    started = time.perf_counter()
    if qtype not in GGUF_TYPES:
        raise AutoquantError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    subfolder = denoiser_subfolder(folder)
    component_dir = folder / subfolder
    source = _read_source_tensors(_weight_shards(component_dir))
    identity = component_identity(folder, subfolder)

    rebuilt = False
    if out is not None:
        if out.suffix != ".gguf":
            raise AutoquantError(
                f"{out}: the file name must end in .gguf, or diffusers won't load it"
            )
        if out.exists():  # saves converting for nothing; the final claim is what guarantees it
            raise _taken(out)
        destination = out
    else:
        destination = (cache_root or cache_dir() / "gguf") / f"{identity}-{qtype}.gguf"
        if destination.exists():
            try:
                summary = _checked_summary(destination, len(source), qtype)
                _check_reusable(destination, summary)
            except CacheCorruptError as exc:
                _log.warning("%s; rebuilding it", exc)
                rebuilt = True
            else:
                return ConvertResult(
                    path=destination,
                    cache_hit=True,
                    rebuilt=False,
                    quantized_tensors=summary.quantized_tensors,
                    kept_tensors=summary.tensor_count - summary.quantized_tensors,
                    file_bytes=destination.stat().st_size,
                    seconds=time.perf_counter() - started,
                )

    scan = _scan_model(component_dir)
    _check_keys_match(component_dir, scan, source)
    plan = _plan_types(source, scan.quantizable_weights, qtype)
    metadata = {
        # First of the file's own keys, so that its place lies in the header's first bytes.
        _KEY_DIGEST: _DIGEST_PLACEHOLDER.decode(),
        _KEY_VERSION: autoquant.__version__,
        _KEY_QTYPE: qtype,
        _KEY_SOURCE: identity,
    }

    def write(path: Path) -> None:
        _write_gguf(path, plan, scan.class_name, metadata, f"GGUF {qtype} {subfolder}", progress)
        # Checked before it takes its final name, so a bad write never becomes a cache entry.
        _seal(path, _checked_summary(path, len(plan), qtype))

    data_bytes = sum(planned.nbytes for planned in plan)
    _write_atomically(destination, write, replace=out is None, data_bytes=data_bytes)
    quantized = sum(1 for planned in plan if planned.quantized)
    return ConvertResult(
        path=destination,
        cache_hit=False,
        rebuilt=rebuilt,
        quantized_tensors=quantized,
        kept_tensors=len(plan) - quantized,
        file_bytes=destination.stat().st_size,
        seconds=time.perf_counter() - started,
    )


def check_gguf(path: Path, expected_tensors: int | None = None) -> None:
    """Raise CacheCorruptError unless ``path`` is a complete GGUF file (header parses, data ends
    where the file ends, and the checksum matches in a file autoquant wrote) holding
    ``expected_tensors`` tensors when that is given."""
    summary = _checked_summary(path, expected_tensors)
    if summary.digest is not None:
        _check_digest(path, summary)


def _taken(out: Path) -> AutoquantError:
    return AutoquantError(f"{out} already exists: pick another --out (it is never overwritten)")


def _check_reusable(path: Path, summary: _GgufSummary) -> None:
    """Raise CacheCorruptError unless this version of autoquant wrote ``path`` and no byte of it
    changed since. The version first: it costs nothing, the checksum reads the whole file."""
    if summary.version != autoquant.__version__:
        raise CacheCorruptError(
            f"{path} was written by autoquant {summary.version}, not {autoquant.__version__}"
        )
    _check_digest(path, summary)


def _check_digest(path: Path, summary: _GgufSummary) -> None:
    if summary.digest is None:
        raise CacheCorruptError(f"{path} has no {_KEY_DIGEST} checksum")
    if _digest(path, summary.digest_offset) != summary.digest:
        raise CacheCorruptError(f"{path} does not match its checksum: its bytes changed")


def _seal(path: Path, summary: _GgufSummary) -> None:
    """Write the checksum of the finished file into its place in the header."""
    digest = _digest(path, summary.digest_offset)
    with open(path, "rb+") as handle:
        handle.seek(summary.digest_offset)
        handle.write(digest.encode())


def _digest(path: Path, digest_offset: int) -> str:
    """The file's checksum (see _DIGEST_SEGMENT), its own 64 characters (at ``digest_offset``)
    read as the placeholder they were when it was computed.

    Cost: one read of the file, hashed on encode_threads() threads at once (reads and hashlib
    release the GIL): sha256 runs at about 1 GB/s per core with the SHA instructions of current
    x86 and ARM CPUs, so a 12 GB file takes seconds from the page cache; from disk the read
    dominates, and it fills the page cache for the pipeline, which loads the file right after.
    """
    size = path.stat().st_size
    hole = range(digest_offset, digest_offset + len(_DIGEST_PLACEHOLDER))

    def segment(start: int) -> bytes:
        hasher = hashlib.sha256()
        chunk = memoryview(bytearray(_DIGEST_READ))
        with open(path, "rb", buffering=0) as handle:
            handle.seek(start)
            position, end = start, min(start + _DIGEST_SEGMENT, size)
            while position < end:
                count = handle.readinto(chunk[: min(_DIGEST_READ, end - position)])
                if not count:
                    break  # the file shrank meanwhile: the digest will not match
                low, high = max(hole.start, position), min(hole.stop, position + count)
                if low < high:
                    placeholder = _DIGEST_PLACEHOLDER[low - hole.start : high - hole.start]
                    chunk[low - position : high - position] = placeholder
                hasher.update(chunk[:count])
                position += count
        return hasher.digest()

    with ThreadPoolExecutor(encode_threads()) as pool:
        segments = pool.map(segment, range(0, size, _DIGEST_SEGMENT))
        return hashlib.sha256(b"".join(segments)).hexdigest()


def _checked_summary(
    path: Path, expected_tensors: int | None, qtype: str | None = None
) -> _GgufSummary:
    summary = _read_summary(path)
    if expected_tensors is not None and summary.tensor_count != expected_tensors:
        raise CacheCorruptError(
            f"{path} holds {summary.tensor_count} tensors where {expected_tensors} were expected"
        )
    if qtype is not None and summary.qtype != qtype:
        raise CacheCorruptError(f"{path} was written for type {summary.qtype!r}, not {qtype!r}")
    return summary


def _read_summary(path: Path) -> _GgufSummary:
    import gguf

    if not path.is_file():
        raise CacheCorruptError(f"{path} does not exist")
    file_bytes = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        qtype, _ = _string_field(reader, _KEY_QTYPE)
        version, _ = _string_field(reader, _KEY_VERSION)
        digest, digest_offset = _string_field(reader, _KEY_DIGEST)
    # Damaged bytes surface as whatever numpy or the parser trips over (ValueError, KeyError,
    # IndexError, UnicodeDecodeError, ...); all mean the same thing here.
    except Exception as exc:
        raise CacheCorruptError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    ends = (t.data_offset + int(t.n_bytes) for t in reader.tensors)
    data_end = max(ends, default=reader.data_offset)
    padded_end = -(-data_end // reader.alignment) * reader.alignment
    # The writer pads the last tensor to the alignment; a file cut inside that padding still holds
    # every byte of data, so only a size outside [data_end, padded_end] is damage.
    if not data_end <= file_bytes <= padded_end:
        raise CacheCorruptError(
            f"{path} is {file_bytes} bytes but its header describes {data_end} bytes of data"
        )
    quantized = sum(1 for t in reader.tensors if not _is_float_type(t.tensor_type))
    return _GgufSummary(len(reader.tensors), quantized, qtype, version, digest, digest_offset)


def _string_field(reader: Any, key: str) -> tuple[str | None, int]:
    """A string of the header and where its characters start in the file (None, -1: absent)."""
    field = reader.get_field(key)
    if field is None:
        return None, -1
    value = field.data[0]  # the parts: key length, key, value type, value length, value
    return str(field.contents()), field.offset + sum(part.nbytes for part in field.parts[:value])


def _weight_shards(component_dir: Path) -> list[Path]:
    """The safetensors files holding one complete copy of the component's weights."""
    candidates: dict[str, list[Path]] = {}  # index or weight file name -> the files it stands for
    indexed: set[Path] = set()
    for index in sorted(component_dir.glob("*.safetensors.index*.json")):
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({component_dir / name for name in weight_map.values()})
        indexed.update(shards)
        candidates[index.name] = shards
    for weights in sorted(component_dir.glob("*.safetensors")):
        if weights not in indexed and not weights.name.startswith("."):
            candidates[weights.name] = [weights]
    # Variants (diffusion_pytorch_model.fp16.safetensors) are taken only when they are all there is.
    standard = [candidates[n] for n in (_WEIGHTS_INDEX_NAME, _WEIGHTS_NAME) if n in candidates]
    if len(standard) == 1:
        return standard[0]
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise AutoquantError(
            f"{component_dir} has no .safetensors weights; re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise AutoquantError(
        f"{component_dir} holds several copies of its weights ({', '.join(sorted(candidates))}); "
        "keep one"
    )


def _read_source_tensors(shards: Iterable[Path]) -> list[_SourceTensor]:
    """Names, shapes and dtypes from the safetensors headers; no tensor data is read."""
    from safetensors import safe_open

    tensors: list[_SourceTensor] = []
    seen: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            # File order, so that writing later reads each shard front to back.
            for name in handle.offset_keys():
                if name in seen:
                    raise AutoquantError(
                        f"tensor {name!r} appears in two weight files of {shard.parent}"
                    )
                seen.add(name)
                tensor_slice = handle.get_slice(name)
                dtype = tensor_slice.get_dtype()
                if dtype not in _FLOAT_ITEMSIZE:
                    raise AutoquantError(
                        f"{shard}: tensor {name!r} has type {dtype}, which a GGUF file for "
                        "diffusers cannot hold"
                    )
                tensors.append(_SourceTensor(name, shard, tuple(tensor_slice.get_shape()), dtype))
    return tensors


def _scan_model(component_dir: Path) -> _ModelScan:
    """Build the denoiser on the meta device to learn its state_dict keys and nn.Linear weights."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    config = json.loads((component_dir / "config.json").read_text(encoding="utf-8"))
    class_name = config.get("_class_name")
    model_class = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None:
        raise AutoquantError(f"{component_dir}/config.json names no diffusers model class")
    if not any(base.__name__ in SINGLE_FILE_LOADABLE_CLASSES for base in model_class.__mro__):
        raise AutoquantError(
            f"diffusers cannot load {class_name} from a single file, so it cannot use a GGUF file"
        )
    # Same context diffusers' from_single_file builds the model in, so the keys agree.
    with init_empty_weights():
        model = model_class.from_config(config)
    keep_in_fp32 = set(model_class._keep_in_fp32_modules or [])
    quantizable = frozenset(
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not keep_in_fp32.intersection(name.split("."))
    )
    return _ModelScan(class_name, frozenset(model.state_dict()), quantizable)


def _check_keys_match(component_dir: Path, scan: _ModelScan, source: list[_SourceTensor]) -> None:
    source_keys = {tensor.name for tensor in source}
    if source_keys == scan.state_dict_keys:
        return
    missing = sorted(scan.state_dict_keys - source_keys)
    unexpected = sorted(source_keys - scan.state_dict_keys)
    raise AutoquantError(
        f"the weights in {component_dir} do not match {scan.class_name} "
        f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}); "
        "diffusers would not load a GGUF file made from them"
    )


def _plan_types(
    source: list[_SourceTensor], quantizable_weights: frozenset[str], qtype: str
) -> list[_PlannedTensor]:
    """Each source tensor with the GGML type it is written as."""
    from gguf import GGMLQuantizationType

    quant_type = GGMLQuantizationType[qtype.upper()]
    plan = []
    for tensor in source:
        if (
            tensor.name in quantizable_weights
            and len(tensor.shape) == 2
            and tensor.shape[-1] % GGUF_BLOCK == 0
        ):
            ggml_type = quant_type
        elif tensor.dtype == "F16":
            ggml_type = GGMLQuantizationType.F16
        else:
            ggml_type = GGMLQuantizationType.F32
        plan.append(_PlannedTensor(tensor, ggml_type))
    return plan


def _write_gguf(
    path: Path,
    plan: list[_PlannedTensor],
    architecture: str,
    metadata: dict[str, str],
    description: str,
    progress: bool,
) -> None:
    """Write the file in one pass: header, metadata and every tensor's info first (sizes are known
    from the plan), then the tensors in order, each read, converted (on a few threads at once),
    written and dropped."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from tqdm import tqdm

    threads = encode_threads()
    writer = gguf.GGUFWriter(path=None, arch=architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        writer.add_string(key, value)
    for planned in plan:
        # With raw_dtype given and a dtype other than uint8, the shape is taken as the logical
        # (unquantized) shape and the dtype argument is otherwise ignored.
        writer.add_tensor_info(
            planned.source.name,
            planned.source.shape,
            np.dtype(np.float32),
            planned.nbytes,
            raw_dtype=planned.ggml_type,
        )
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total_bytes = sum(planned.source.nbytes for planned in plan)
        with (
            tqdm(
                total=total_bytes,
                desc=description,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
            ThreadPoolExecutor(threads) as pool,
        ):
            # Written in plan order (write_tensor_data pairs data with the infos by position);
            # at most `threads` tensors are read and encoding at any time.
            in_flight: collections.deque[tuple[Future[np.ndarray[Any, Any]], int]]
            in_flight = collections.deque()

            def write_oldest() -> None:
                encoded, nbytes = in_flight.popleft()
                writer.write_tensor_data(encoded.result())
                bar.update(nbytes)

            # The plan lists tensors shard by shard (as _read_source_tensors found them), so
            # each shard is opened once and read front to back.
            for shard, in_shard in itertools.groupby(plan, key=lambda p: p.source.shard):
                with safe_open(str(shard), framework="pt") as handle:
                    for planned in in_shard:
                        tensor = handle.get_tensor(planned.source.name)
                        job = pool.submit(_encode, tensor, planned.ggml_type)
                        in_flight.append((job, planned.source.nbytes))
                        if len(in_flight) >= threads:
                            write_oldest()
            while in_flight:
                write_oldest()
    finally:
        writer.close()


def encode_threads() -> int:
    return max(1, min(_MAX_ENCODE_THREADS, os.cpu_count() or 1))


def _encode(tensor: torch.Tensor, ggml_type: Any) -> np.ndarray[Any, Any]:
    import gguf
    import torch

    if ggml_type == gguf.GGMLQuantizationType.F16:
        return tensor.numpy()  # planned only for tensors stored as fp16
    as_float32 = tensor.to(torch.float32).numpy()
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return as_float32
    return gguf.quants.quantize(as_float32, ggml_type)


def _is_float_type(ggml_type: Any) -> bool:
    import gguf

    return ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _write_atomically(
    destination: Path, write: Callable[[Path], None], *, replace: bool, data_bytes: int
) -> None:
    """Let ``write`` fill a temporary file that then becomes ``destination``: a cache entry is
    replaced, a file the user named (not ``replace``) never is. A full disk is one line, and
    the temporary file is removed."""
    try:
        with atomic_path(destination, overwrite=replace) as temp:
            write(temp)
    except FileExistsError as exc:
        raise _taken(destination) from exc
    except OSError as exc:
        # numpy's tofile, which writes the tensors, reports a short write without its errno
        # ("N requested and M written"). The temporary file is gone by now: the disk is full if
        # the whole file does not fit in what is free.
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or (
            exc.errno is None and shutil.disk_usage(destination.parent).free < data_bytes
        )
        if not full:
            raise
        elsewhere = (
            "set AUTOQUANT_CACHE_DIR to a folder on a disk with room"
            if replace
            else "pick an --out on a disk with room"
        )
        raise AutoquantError(
            f"no space left on device writing {destination}: free {format_bytes(data_bytes)} "
            f"there or {elsewhere}"
        ) from exc
