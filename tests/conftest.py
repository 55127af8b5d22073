"""Shared test set-up: one thread (tiny forwards swing 50× with two on a busy 2-core machine),
and a session-wide cache dir so built-in models are materialized once per test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("autoquant-cache")


@pytest.fixture(autouse=True)
def _cache_dir(session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tests that need an empty cache set their own; the rest share the session's.
    if "AUTOQUANT_CACHE_DIR" not in os.environ or os.environ["AUTOQUANT_CACHE_DIR"] != str(
        session_cache
    ):
        monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(session_cache))
    yield
