"""From a hub id to a pipeline folder on disk: the snapshot in the Hugging Face cache when it holds
what the use needs (no network round trip, offline too), else a download of just the files the
pipeline loads. Downloads are refused quickly, in one line, when the hub cannot be reached, so an
offline machine never hangs in one.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from autoquant.core.errors import ModelNotFoundError
from autoquant.models.identity import is_component_entry

HUB_CONNECT_TIMEOUT_S = 3.0
T = TypeVar("T")
# What planning reads. The whole pipeline is fetched file by file (variant.hub_weight_files):
# configs, tokenizer files and one copy of each component's safetensors weights; never pickles,
# never root-level single-file checkpoints, never the variant duplicates that do not load.
HUB_CONFIG_PATTERNS = ["model_index.json", "*/config.json"]


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


def download_from_hub(repo_id: str, *, configs_only: bool, variant: str | None = None) -> Path:
    """The snapshot folder of a hub pipeline: only its configs, or everything needed to load it
    with ``variant`` (None: its standard weights, or the only variant it ships). A snapshot in
    the Hugging Face cache that holds all of that is used as it is, with no network round trip;
    only a missing or partial one (configs alone, from planning) sends autoquant to the hub."""
    cached = _cached_snapshot(repo_id)
    lacking = (
        _snapshot_lacks(repo_id, cached, configs_only, variant) if cached else "no snapshot of it"
    )
    if lacking is None:
        assert cached is not None
        return cached
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub to download {repo_id!r} ({reason}, and the cache "
            f"has {lacking}): pass a local diffusers folder or a builtin: model; see "
            "`autoquant models`"
        )
    folder = _snapshot(repo_id, HUB_CONFIG_PATTERNS)
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"hub repo {repo_id!r} has no model_index.json: not a pipeline")
    if configs_only:
        return folder
    from huggingface_hub import HfApi

    from autoquant.models.variant import hub_weight_files

    listing = _cached_listing(repo_id) or _hub_call(
        repo_id, lambda: HfApi().list_repo_files(repo_id)
    )
    return _snapshot(repo_id, hub_weight_files(listing, _components(folder), variant, repo_id))


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of the repo's main branch, found by the hub client's own lookup
    (refs/main → snapshots/<commit>/model_index.json); reads the disk only."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def _cached_listing(repo_id: str) -> list[str] | None:
    """Every file of the repo at the cached snapshot's commit, from the listing the hub client
    caches beside it (huggingface_hub 2.x; older clients keep none); reads the disk only."""
    import huggingface_hub

    cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if cached_tree is None:
        return None
    try:
        return [entry.path for entry in cached_tree(repo_id)]
    # None cached (CachedRepoTreeNotFoundError, a class older clients lack), or unreadable.
    except Exception:
        return None


def _snapshot_lacks(
    repo_id: str, folder: Path, configs_only: bool, variant: str | None
) -> str | None:
    """What a cached snapshot lacks for this use, in words ("no weights of unet"); None when
    it holds everything: the configs planning reads and, to load, every file a download would
    fetch (by the cached listing of the repo) or, without a listing, what
    variant.missing_weights asks for."""
    from autoquant.models.components import counted_components
    from autoquant.models.variant import hub_weight_files, missing_weights

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        counted = counted_components(index)
        unconfigured = [name for name in counted if not (folder / name / "config.json").is_file()]
        if unconfigured:
            return f"no config of {', '.join(unconfigured)}"
        if configs_only:
            return None
        listing = _cached_listing(repo_id)
        if listing is None:
            return missing_weights(folder, variant)
        wanted = hub_weight_files(listing, _components(folder), variant, repo_id)
        absent = [name for name in wanted if not (folder / name).is_file()]
        return f"no {', '.join(absent[:3])}{' …' if absent[3:] else ''}" if absent else None
    except (OSError, ValueError, TypeError, AttributeError):  # not the JSON diffusers writes
        return "no readable model_index.json"


def _components(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return [name for name, entry in index.items() if is_component_entry(entry)]


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(_hub_call(repo_id, lambda: snapshot_download(repo_id, allow_patterns=patterns)))


def _hub_call(repo_id: str, call: Callable[[], T]) -> T:
    try:
        return call()
    # Whatever the hub client raises (missing or gated repo, network, disk) is the environment's
    # problem, reported in one line with the cause chained.
    except Exception as exc:
        one_line = " ".join(str(exc).split())
        raise ModelNotFoundError(
            f"downloading {repo_id!r} from the hub failed: {one_line}"
        ) from exc
