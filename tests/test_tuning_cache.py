"""The tuning cache: hits, what re-tunes, corrupt stores, concurrent writers, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from autoquant.cli.main import main
from autoquant.execute import ladder as executor
from autoquant.execute import tuning_entry
from autoquant.execute.tuning import TuneOptions, tune
from autoquant.store.tuning_store import TuningStore


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session_cache: Path) -> Path:
    """An empty tuning store, sharing the session's built models and GGUF files."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("models", "gguf", "inventory"):
        if (session_cache / shared).exists():
            (cache / shared).symlink_to(session_cache / shared)
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(cache))
    return cache


def _tune(**kw: Any) -> Any:
    return tune(TuneOptions(device="cpu", progress=False, **kw))


def test_second_run_is_a_cache_hit_that_skips_the_ladder(fresh_cache: Path) -> None:
    first = _tune()
    assert first.cache is not None and first.cache["hit"] is False
    second = _tune()
    assert second.cache == {**first.cache, "hit": True}
    assert len(second.attempts) == 1 and second.chosen.label == first.chosen.label
    assert second.report()["cache"]["hit"] is True


def test_changed_versions_model_or_size_retune(
    fresh_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoquant import models

    folder = tmp_path / "my-model"
    shutil.copytree(models.materialize(models.resolve("builtin:tiny-sd"), progress=False), folder)
    assert _tune(model=str(folder)).cache["hit"] is False
    assert _tune(model=str(folder)).cache["hit"] is True
    assert _tune(model=str(folder), width=72, height=72).cache["hit"] is False

    real = tuning_entry.torch_and_diffusers_versions
    monkeypatch.setattr(
        tuning_entry,
        "torch_and_diffusers_versions",
        lambda: {**real(), "torch": "9.9.9"},
    )
    assert _tune(model=str(folder)).cache["hit"] is False
    monkeypatch.undo()
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(fresh_cache))

    weights = next((folder / "unet").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the weights changed
    assert _tune(model=str(folder)).cache["hit"] is False


def test_retune_flag_ignores_the_saved_decision(fresh_cache: Path) -> None:
    _tune()
    result = _tune(retune=True)
    assert result.cache is not None and result.cache["hit"] is False


def test_garbage_store_warns_and_retunes(fresh_cache: Path) -> None:
    store = fresh_cache / "tuning.json"
    store.write_text("{not json at all")
    warnings: list[str] = []
    result = tune(TuneOptions(device="cpu", progress=False), log=warnings.append)
    assert result.cache is not None and result.cache["hit"] is False
    assert any("unreadable" in w for w in warnings)
    assert list(fresh_cache.glob("tuning.json.corrupt-*")), "the bad store is kept aside"
    assert json.loads(store.read_text())["entries"], "a fresh store was written"


def test_oom_tiers_are_remembered_and_skipped(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = executor.build_tier
    calls: list[str] = []
    out_of_memory = {"first": True}

    def build(planned: Any, **kw: Any) -> Any:
        calls.append(planned.label)
        if out_of_memory.pop("first", False):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_build(planned, **kw)

    monkeypatch.setattr(executor, "build_tier", build)
    first = _tune()
    assert first.attempts[0].outcome == "oom" and first.chosen_index == 1
    calls.clear()
    second = _tune()
    assert second.cache is not None and second.cache["hit"]
    assert calls == [first.chosen.label], "the tier that ran out of memory was not retried"


def _writer(path: str, prefix: str) -> None:
    store = TuningStore(Path(path))
    for i in range(25):
        store.put(f"{prefix}{i}", {"updated": str(i), "model": prefix})


def test_two_processes_writing_at_once_keep_both(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    code = (
        "import sys; from tests.test_tuning_cache import _writer; _writer(sys.argv[1], sys.argv[2])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), name], cwd=Path(__file__).parents[1]
        )
        for name in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = TuningStore(path).entries()
    assert len(entries) == 50 and {e["model"] for e in entries.values()} == {"a", "b"}


def test_export_reproduces_the_decision(
    fresh_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _tune(backend="quanto", precision="int8")
    key = result.cache["key"]
    out = tmp_path / "profile.yaml"
    assert main(["cache", "export", key, "--out", str(out)]) == 0
    assert main(["cache", "export", key, "--out", str(out)]) == 2, "never overwrites"
    capsys.readouterr()
    assert main(["plan", "--json", "--profile", str(out)]) == 0
    chosen = json.loads(capsys.readouterr().out)["chosen"]
    assert (chosen["backend"], chosen["precision"]) == ("quanto", "int8")
    assert chosen["memory_options"] == list(result.chosen.tier.memory_options)


def test_cache_list_show_clear(fresh_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = _tune().cache["key"]
    assert main(["cache", "list"]) == 0 and key in capsys.readouterr().out
    assert main(["cache", "show", key]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"]["backend"] == "gguf"
    assert main(["cache", "show", "nope"]) == 2
    assert main(["cache", "clear", key]) == 0
    assert TuningStore().entries() == {}
