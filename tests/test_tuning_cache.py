"""The tuning cache: hits, what re-tunes, corrupt stores, concurrent writers, export."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from machines import made_up_machine

from autoquant.cli.main import main
from autoquant.core.errors import AutoquantError
from autoquant.execute import ladder as executor
from autoquant.execute import tuning, tuning_entry
from autoquant.execute.tuning import TuneOptions, tune
from autoquant.execute.tuning_entry import TuningKey, known_oom, tuning_key
from autoquant.store import tuning_store
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


def _retunes_with_the_store_set_aside(cache: Path) -> None:
    """A run over an unreadable store warns, keeps the store aside and writes a fresh one."""
    warnings: list[str] = []
    result = tune(TuneOptions(device="cpu", progress=False), log=warnings.append)
    assert result.cache is not None and result.cache["hit"] is False
    assert any("unreadable" in w for w in warnings)
    assert list(cache.glob("tuning.json.corrupt-*")), "the bad store is kept aside"
    assert json.loads((cache / "tuning.json").read_text())["entries"], "a fresh store was written"


def test_garbage_store_warns_and_retunes(fresh_cache: Path) -> None:
    store = fresh_cache / "tuning.json"
    store.write_text("{not json at all")
    _retunes_with_the_store_set_aside(fresh_cache)


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


def _at_once(function: str, path: Path) -> None:
    """Run ``function(path, name)`` of this module in two processes at once, named a and b."""
    code = (
        f"import sys; sys.path.insert(0, 'tests'); from test_tuning_cache import {function}; "
        f"{function}(*sys.argv[1:])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), name], cwd=Path(__file__).parents[1]
        )
        for name in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]


def test_two_processes_writing_at_once_keep_both(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    _at_once("_writer", path)
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
    assert json.loads(capsys.readouterr().out)["chosen"]["backend"] == "none"
    assert main(["cache", "show", "nope"]) == 2
    assert main(["cache", "clear", key]) == 0
    assert TuningStore().entries() == {}


@pytest.mark.parametrize("kind", ["not utf-8", "a folder"])
def test_an_unreadable_store_of_any_kind_is_moved_aside(fresh_cache: Path, kind: str) -> None:
    store = fresh_cache / "tuning.json"
    if kind == "a folder":
        store.mkdir()
    else:
        store.write_bytes(b"\xff\xfe{\x00garbage\x80")
    _retunes_with_the_store_set_aside(fresh_cache)


def test_a_read_only_cache_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Permissions do not stop root (CI runs as root): a read-only filesystem is what refuses.
    def read_only(path: Path, text: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(tuning_store, "write_text_atomic", read_only)
    with pytest.raises(AutoquantError, match="AUTOQUANT_CACHE_DIR") as caught:
        TuningStore(tmp_path / "tuning.json").put("key", {"model": "x"})
    assert "Read-only file system" in str(caught.value) and "\n" not in str(caught.value)


def test_a_cache_that_is_a_file_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(AutoquantError, match="cannot use the tuning cache") as caught:
        TuningStore(blocker / "tuning.json").entries()
    assert "\n" not in str(caught.value)


def _adder(path: str, label: str) -> None:
    """Add outcomes to one shared entry, 20 times, as concurrent `autoquant run`s of one key do."""
    store = TuningStore(Path(path))
    for i in range(20):

        def add(current: dict[str, Any] | None, i: int = i) -> dict[str, Any]:
            outcomes = list((current or {}).get("outcomes", []))
            return {"outcomes": [*outcomes, {"label": f"{label}{i}", "outcome": "oom"}]}

        store.update("one-key", add)


def test_two_processes_updating_one_key_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    _at_once("_adder", path)
    labels = {o["label"] for o in TuningStore(path).entries()["one-key"]["outcomes"]}
    assert labels == {f"{name}{i}" for name in "ab" for i in range(20)}


def test_tune_merges_under_the_lock(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What another process saved for the key while this one tuned is kept, not overwritten by
    the entry this process read before it started."""
    first = _tune()
    key = first.cache["key"]
    real_execute = tuning.execute

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        def other(current: dict[str, Any] | None) -> dict[str, Any]:
            assert current is not None
            extra = {"label": "another tier", "outcome": "oom", "free_bytes": 1}
            return {**current, "outcomes": [*current["outcomes"], extra]}

        TuningStore().update(key, other)
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(tuning, "execute", meanwhile)
    _tune()
    labels = {o["label"] for o in TuningStore().get(key)["outcomes"]}
    assert "another tier" in labels


def test_an_oom_is_retried_once_more_memory_is_free() -> None:
    entry = {
        "outcomes": [
            {"label": "big", "outcome": "oom", "free_bytes": 8 * 10**9},
            {"label": "old", "outcome": "oom"},  # saved before free memory was recorded
            {"label": "fine", "outcome": "chosen", "free_bytes": 8 * 10**9},
        ]
    }
    assert known_oom(entry, free_now=8 * 10**9) == {"big", "old"}
    assert known_oom(entry, free_now=12 * 10**9) == {"old"}  # another process let go of 4 GB


def test_the_key_holds_the_gpu_count_host_ram_and_accelerate() -> None:
    from autoquant.models import inventory, resolve
    from autoquant.planner import plan

    inv = inventory(resolve("builtin:tiny-sd"))

    def digest(**machine: Any) -> TuningKey:
        profile = made_up_machine(**machine)
        return tuning_key(profile, plan(profile, inv), "identity")

    key = digest(device="cuda", vram=16 * 10**9)
    assert key.fields["gpu_count"] == 1 and "accelerate" in key.fields["versions"]
    assert digest(device="cuda", vram=16 * 10**9, ram_gib=32).digest != key.digest


def test_a_broken_tier_is_not_saved_as_the_decision(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = executor.build_tier
    broken = {"once": True}

    def build(planned: Any, **kw: Any) -> Any:
        if broken.pop("once", False):
            raise ValueError("tensor 'down_blocks.0.weight' is missing from the GGUF file")
        return real_build(planned, **kw)

    monkeypatch.setattr(executor, "build_tier", build)
    warnings: list[str] = []
    first = tune(TuneOptions(device="cpu", progress=False), log=warnings.append)
    assert first.attempts[0].outcome == "error" and first.chosen_index == 1
    assert any("not saving the tuning decision" in w for w in warnings)
    assert TuningStore().entries() == {}
    second = _tune()  # the repaired tier is tried again, not skipped for the fallback
    assert second.cache["hit"] is False and second.chosen_index == 0


def test_a_forced_tier_that_breaks_is_an_error_not_a_substitute(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(planned: Any, **kw: Any) -> Any:
        raise ValueError("tensor 'down_blocks.0.weight' is missing from the GGUF file")

    monkeypatch.setattr(executor, "build_tier", build)
    with pytest.raises(AutoquantError, match="forced tier gguf q4_0 failed at load") as caught:
        _tune(backend="gguf", precision="q4_0")
    assert "missing from the GGUF file" in str(caught.value)
    assert TuningStore().entries() == {}
