"""Hub models from the Hugging Face cache: a snapshot already there plans and runs with the
network blocked, a partial one (configs only) is told from a whole one, and a download fetches
the files of the weights variant asked for and no others.

The cache is built here in the hub client's layout (models--org--name/refs/main,
snapshots/<commit>/… linked to blobs/<sha256>), holding builtin:tiny-sd saved as a folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoquant.cli.main import main
from autoquant.core.errors import ModelNotFoundError
from autoquant.models import materialize, resolve
from autoquant.models.hub import download_from_hub

REPO_ID = "org/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory, session_cache: Path) -> Path:
    """builtin:tiny-sd as a diffusers folder, with an fp16 variant beside its weights, a
    pickle, a root-level checkpoint and a folder model_index.json does not name: what a hub
    repo holds besides what loads."""
    from diffusers import DiffusionPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOQUANT_CACHE_DIR", str(session_cache))
        builtin = materialize(resolve("builtin:tiny-sd"), progress=False)
    folder = tmp_path_factory.mktemp("repo") / "tiny"
    pipe = DiffusionPipeline.from_pretrained(str(builtin))
    pipe.save_pretrained(str(folder))
    pipe.save_pretrained(str(folder), variant="fp16")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle")
    (folder / "tiny.safetensors").write_bytes(b"a single-file checkpoint")
    shutil.copytree(folder / "vae", folder / "vae_1_0")
    return folder


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _cache_files(hub_cache: Path, repo: Path, files: list[str]) -> Path:
    """Put ``files`` of the folder ``repo`` into the hub cache as the client does: each file a
    blob named by its hash, linked from the snapshot of COMMIT, which refs/main names."""
    storage = hub_cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    for name in files:
        data = (repo / name).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def _loadable(name: str) -> bool:
    """What a download of the standard pipeline fetches."""
    return (
        "/" in name
        and not name.startswith("vae_1_0/")
        and ".fp16." not in name
        and (not name.endswith(".bin"))
    )


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    root = tmp_path / "hub"
    # The client reads HF_HUB_CACHE once, at import: its constant is what it looks in.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attempt to open a network connection, each refused."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_a_cached_hub_pipeline_plans_and_runs_without_a_connection(
    offline: bool,
    tiny_sd: Path,
    hub_cache: Path,
    connections: list[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snapshot = _cache_files(
        hub_cache, tiny_sd, ["model_index.json", *filter(_loadable, _files(tiny_sd))]
    )
    assert main(["plan", "-m", REPO_ID, "--device", "cpu"]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    run = ["run", "-m", REPO_ID, "--device", "cpu", "--steps", "1", "--out", str(out), "--json"]
    assert main(run) == 0, capsys.readouterr().err
    assert (out / "image.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["model"] == REPO_ID
    assert connections == []
    assert _files(snapshot) == ["model_index.json", *filter(_loadable, _files(tiny_sd))]


def test_a_snapshot_of_configs_alone_plans_but_does_not_pass_for_a_whole_one(
    tiny_sd: Path, hub_cache: Path, connections: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What planning downloads (HUB_CONFIG_PATTERNS): model_index.json and */config.json.
    configs = [name for name in _files(tiny_sd) if name.endswith("/config.json")]
    _cache_files(hub_cache, tiny_sd, ["model_index.json", *configs])
    from autoquant.models import inventory

    assert inventory(resolve(REPO_ID)).denoiser.name == "unet"  # planning reads configs only
    assert connections == []
    with pytest.raises(ModelNotFoundError) as offline:
        materialize(resolve(REPO_ID))
    message = str(offline.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "the cache has no folder of scheduler, tokenizer" in message
    # Online, the partial snapshot sends autoquant to the hub (here: refused at the socket).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError, match="cannot reach the Hugging Face hub"):
        materialize(resolve(REPO_ID))
    assert connections


def test_a_snapshot_missing_a_shard_is_not_whole(
    tiny_sd: Path, hub_cache: Path, tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    sharded = tmp_path / "sharded"
    DiffusionPipeline.from_pretrained(str(tiny_sd)).save_pretrained(
        str(sharded), max_shard_size="300KB"
    )
    shards = sorted(sharded.glob("unet/*-of-*.safetensors"))
    assert len(shards) > 1
    files = [name for name in _files(sharded) if name != shards[-1].relative_to(sharded).as_posix()]
    _cache_files(hub_cache, sharded, files)
    with pytest.raises(ModelNotFoundError, match="the cache has no weights of unet"):
        download_from_hub(REPO_ID, configs_only=False)
    _cache_files(hub_cache, sharded, _files(sharded))
    assert download_from_hub(REPO_ID, configs_only=False).name == COMMIT


def test_a_hub_id_not_in_the_cache_fails_offline_in_one_fast_line(
    hub_cache: Path, connections: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    assert main(["plan", "-m", "org/absent"]) == 2
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        "cannot reach the Hugging Face hub to download 'org/absent' (HF_HUB_OFFLINE is set" in err
    )
    assert "the cache has no snapshot of it" in err
    assert connections == []


def _cache_listing(hub_cache: Path, repo: Path) -> None:
    """The listing of every file of the repo that the hub client (2.x) caches beside a
    snapshot as it downloads, in its documented format (huggingface_hub/_tree_cache.py)."""
    storage = hub_cache / f"models--{REPO_ID.replace('/', '--')}"
    files = {
        name: {
            "size": (repo / name).stat().st_size,
            "blob_id": hashlib.sha1(name.encode()).hexdigest(),
        }
        for name in _files(repo)
    }
    (storage / "trees").mkdir(parents=True, exist_ok=True)
    (storage / "trees" / f"{COMMIT}.json").write_text(
        json.dumps({"format_version": 1, "files": files})
    )


@pytest.fixture(params=[True, False], ids=["listing-cached", "no-listing"])
def remote(
    request: pytest.FixtureRequest, tiny_sd: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[list[str]]]:
    """The hub, for the folder tiny_sd as repo REPO_ID: its file listing, and downloads that put
    the files the patterns allow into the cache (by the hub client's own pattern filter),
    caching the repo's listing too as huggingface_hub 2.x does (or not, as older clients);
    each download's files are recorded. The reachability check connects to a local listener."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    fetched: list[list[str]] = []

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **_: Any) -> str:
        assert repo_id == REPO_ID
        files = list(filter_repo_objects(_files(tiny_sd), allow_patterns=allow_patterns))
        fetched.append(files)
        if request.param:
            _cache_listing(hub_cache, tiny_sd)
        return str(_cache_files(hub_cache, tiny_sd, files))

    def list_repo_files(_api: Any, repo_id: str, **_: Any) -> list[str]:
        assert repo_id == REPO_ID
        return _files(tiny_sd)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        yield fetched


def _weights(files: list[str]) -> list[str]:
    return sorted(name for name in files if ".safetensors" in name)


STANDARD = [
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
FP16 = [
    "text_encoder/model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]


def test_a_download_fetches_the_standard_weights_by_default(remote: list[list[str]]) -> None:
    folder = download_from_hub(REPO_ID, configs_only=False)
    configs, pipeline = remote
    assert sorted(configs) == [  # planning's files first (a folder of any name)
        "model_index.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "vae_1_0/config.json",
    ]
    assert _weights(pipeline) == STANDARD
    assert "tokenizer/tokenizer.json" in pipeline and "scheduler/scheduler_config.json" in pipeline
    assert not [name for name in pipeline if name.startswith("vae_1_0/")]
    # Nothing else: no pickle, no fp16 duplicate, no root-level checkpoint.
    assert _files(folder) == sorted({*configs, *pipeline})
    assert download_from_hub(REPO_ID, configs_only=False) == folder
    assert download_from_hub(REPO_ID, configs_only=True) == folder
    assert len(remote) == 2  # from the cache, the second time


def test_a_download_with_a_variant_fetches_its_weights_and_not_the_standard_ones(
    remote: list[list[str]],
) -> None:
    folder = download_from_hub(REPO_ID, configs_only=False, variant="fp16")
    assert _weights(remote[-1]) == FP16 and _weights(_files(folder)) == FP16
    assert download_from_hub(REPO_ID, configs_only=False, variant="fp16") == folder
    assert len(remote) == 2  # cached
    with pytest.raises(ModelNotFoundError) as missing:
        download_from_hub(REPO_ID, configs_only=False, variant="bf16")
    assert str(missing.value) == (
        "hub repo 'org/tiny' has no bf16 weights variant; its weights: fp16, standard"
    )
    assert all(".safetensors" not in name for name in remote[2:])  # refused before any weights
