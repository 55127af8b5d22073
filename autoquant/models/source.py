"""From what the user typed to a model source, and from a hub source to files on disk.

A spec is ``builtin:NAME``, a local diffusers folder (one with ``model_index.json``), or a hub id
``org/name``. Hub downloads are refused quickly, in one line, when the hub cannot be reached, so
an offline machine never hangs in a download.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from autoquant.core.errors import ModelNotFoundError
from autoquant.models.builtin import builtin_names, load_builtin
from autoquant.models.types import ModelSource

BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Specs ending like this are files someone meant to pass, never hub repos.
FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".gguf", ".json")
# Checkpoints saved with torch.save: unpickling one can run any code it carries.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
HUB_CONNECT_TIMEOUT_S = 3.0
# Only configs, tokenizer files and safetensors weights of the pipeline's component folders:
# never pickles, never root-level single-file checkpoints, never the fp16/EMA duplicates.
HUB_CONFIG_PATTERNS = ["model_index.json", "*/config.json"]
HUB_PIPELINE_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
HUB_IGNORED_PATTERNS = ["*.fp16.*", "*non_ema*", "*.ema.*"]


def resolve(spec: str) -> ModelSource:
    """Read a model spec; raises ModelNotFoundError (one line) for anything unusable."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        load_builtin(name)  # raises, listing the built-ins, for an unknown name
        return ModelSource(spec, "builtin", name)
    if not spec.strip():
        raise ModelNotFoundError(f"empty model spec: {_what_to_pass()}")
    path = Path(spec).expanduser()
    if path.exists():
        return ModelSource(spec, "local", str(_pipeline_folder(path)))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"no such folder: {path}")
    if HUB_ID.match(spec):
        return ModelSource(spec, "hub", spec)
    hint = f" (did you mean builtin:{spec}?)" if spec in builtin_names() else ""
    raise ModelNotFoundError(f"cannot read {spec!r} as a model{hint}: {_what_to_pass()}")


def _what_to_pass() -> str:
    names = ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
    return f"pass one of {names}, a local diffusers folder or a hub id org/name"


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith(("/", os.sep))
        or spec.count("/") > 1  # a hub id has exactly one
        or (os.sep != "/" and os.sep in spec)
        or spec.lower().endswith(FILE_SUFFIXES)
    )


def _pipeline_folder(path: Path) -> Path:
    if not path.is_dir() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelNotFoundError(
            f"{path} is a pickled checkpoint, and autoquant loads only safetensors (unpickling "
            "can run code the file carries): where you trust it, convert it once with diffusers' "
            "from_single_file(...).save_pretrained(FOLDER) and pass the folder"
        )
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a file: pass a diffusers folder (with model_index.json); a single-file "
            "checkpoint loads with diffusers' from_single_file(...).save_pretrained(FOLDER)"
        )
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no model_index.json: it is not a diffusers pipeline folder"
        )
    return path.resolve()


def hub_unreachable_reason(timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now, or None if a TCP connection to it opens in time."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port}: {exc.strerror or exc}")

    # A thread bounds the DNS lookup too, which create_connection's timeout does not cover.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {timeout_s:g} s"


def download_from_hub(repo_id: str, *, configs_only: bool) -> Path:
    """The snapshot folder of a hub pipeline: only its configs, or everything needed to load it."""
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub to download {repo_id!r} ({reason}): pass a local "
            "diffusers folder or a builtin: model; see `autoquant models`"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                allow_patterns=HUB_CONFIG_PATTERNS if configs_only else HUB_PIPELINE_PATTERNS,
                ignore_patterns=HUB_IGNORED_PATTERNS,
            )
        )
    # Whatever the hub client raises (missing or gated repo, network, disk) is the environment's
    # problem, reported in one line with the cause chained.
    except Exception as exc:
        one_line = " ".join(str(exc).split())
        raise ModelNotFoundError(
            f"downloading {repo_id!r} from the hub failed: {one_line}"
        ) from exc
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"hub repo {repo_id!r} has no model_index.json: not a pipeline")
    return folder
