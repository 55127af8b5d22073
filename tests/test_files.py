"""Files autoquant writes (core/fsutil.py): concurrent writers never replace each other's files,
killed writers' temporaries are removed by the next writer, and modes follow the umask.

Races and kills use real processes: each child runs one of the ``_child_*`` functions below
(``python -c "from tests.test_files import ..."``), and waits for a "go" file so that all of them
start at once.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from autoquant.cli import outputs
from autoquant.cli.main import main
from autoquant.core import fsutil
from autoquant.core.fsutil import atomic_dir, atomic_file, write_new, write_text_atomic
from autoquant.store.tuning_store import TuningStore

ROOT = Path(__file__).parents[1]
materialize_module = importlib.import_module("autoquant.models.materialize")


def _short_markdown(report: dict[str, Any]) -> str:
    # Naming is under test, not the report's layout: write_run's markdown is stubbed out.
    return f"# {report['model']}\n"


def _wait_for(go: Path) -> None:
    while not go.exists():
        time.sleep(0.002)


def _start_together(go: Path) -> None:
    print("ready", flush=True)
    _wait_for(go)


def slow_disk() -> None:
    """Make every fsync of this process take 0.3 s more: racing writers then overlap for
    certain, as they do with large files, instead of finishing faster than they start."""
    real = os.fsync

    def fsync(fd: int) -> None:
        time.sleep(0.3)
        real(fd)

    os.fsync = fsync


def _child_runs(out: str, writer: str, runs: str, go: str) -> None:
    outputs.report_markdown = _short_markdown
    _start_together(Path(go))
    for run in range(int(runs)):
        image = Image.new("RGB", (4, 4), (int(writer), run, 0))
        outputs.write_run(Path(out), image, {"model": f"{writer}/{run}"})


def _child_export(out: str, key: str, go: str) -> None:
    slow_disk()
    _start_together(Path(go))
    sys.exit(main(["cache", "export", key, "--out", out]))


def _child_killed_mid_write(kind: str, folder: str) -> None:
    """Start writing a file in ``folder`` (or the built-in tiny-sd, whose folder is in the
    cache's models/), say so on stdout, and hang until killed."""
    if kind == "file":
        with atomic_file(Path(folder) / "weights.bin") as handle:
            handle.write(b"partial")
            handle.flush()
            print("writing", flush=True)
            time.sleep(600)
    else:

        def build_slowly(spec: Any, folder: Path, **_: Any) -> None:
            (folder / "unet").mkdir()
            (folder / "unet" / "weights").write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(600)

        materialize_module.write_builtin = build_slowly
        materialize_module.materialize(_tiny_sd(), progress=False)


def _child_slow_writer(target: str, go: str) -> None:
    """Write ``target`` in two halves, waiting for ``go`` in between."""
    with atomic_file(Path(target)) as handle:
        handle.write(b"first half, ")
        handle.flush()
        print("writing", flush=True)
        _wait_for(Path(go))
        handle.write(b"second half")


def _go(children: list[subprocess.Popen[str]], go: Path) -> None:
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n", child.stderr
    go.touch()


def _start(call: str, *args: str) -> subprocess.Popen[str]:
    code = f"import sys; from tests.test_files import {call}; {call}(*sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _tiny_sd() -> Any:
    from autoquant.models import resolve

    return resolve("builtin:tiny-sd")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _fake_tuning_entry() -> dict[str, Any]:
    """The fields `cache export` reads."""
    return {
        "model": "builtin:tiny-sd",
        "updated": "2025-01-01T00:00:00",
        "key": {"accelerator": "cpu", "cpu": "test cpu", "width": 64, "height": 64, "batch": 1},
        "chosen": {
            "label": "quanto int8",
            "backend": "quanto",
            "precision": "int8",
            "memory_options": [],
            "components": ["unet"],
        },
    }


def test_concurrent_runs_into_one_folder_keep_every_file(tmp_path: Path) -> None:
    out, go = tmp_path / "out", tmp_path / "go"
    writers, runs = 6, 5
    children = [_start("_child_runs", str(out), str(w), str(runs), str(go)) for w in range(writers)]
    _go(children, go)
    for child in children:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr

    names = sorted(p.name for p in out.iterdir())
    assert len(names) == writers * runs * 3, names  # nothing replaced, nothing left over
    seen = []
    for report_json in out.glob("report*.json"):
        suffix = report_json.stem.removeprefix("report")
        model = json.loads(report_json.read_text())["model"]
        # The run's three files share its suffix.
        assert (out / f"report{suffix}.md").read_text() == f"# {model}\n"
        writer, run = (int(part) for part in model.split("/"))
        pixel = Image.open(out / f"image{suffix}.png").getpixel((0, 0))
        assert pixel == (writer, run, 0)
        seen.append((writer, run))
    assert sorted(seen) == [(w, r) for w in range(writers) for r in range(runs)]


def test_a_set_of_names_partly_taken_is_passed_over_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "report_markdown", _short_markdown)
    (tmp_path / "report.md").write_text("an earlier run's")
    paths = outputs.write_run(tmp_path, Image.new("RGB", (2, 2)), {"model": "m"})

    assert {p.name for p in paths.values()} == {"image-2.png", "report-2.json", "report-2.md"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image-2.png",
        "report-2.json",
        "report-2.md",
        "report.md",
    ]
    assert (tmp_path / "report.md").read_text() == "an earlier run's"


def test_a_name_taken_after_the_check_moves_the_whole_set_on(tmp_path: Path) -> None:
    # The candidate list says set "a" is free, but its second name exists by the time it is
    # claimed: its first name is given back and set "b" is taken.
    taken = tmp_path / "a2"
    taken.write_bytes(b"someone else's")
    candidates = [[tmp_path / "a1", taken], [tmp_path / "b1", tmp_path / "b2"]]

    assert write_new(candidates, [b"one", b"two"]) == candidates[1]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a2", "b1", "b2"]
    assert taken.read_bytes() == b"someone else's"
    assert (tmp_path / "b1").read_bytes() == b"one"
    with pytest.raises(FileExistsError):
        write_new([[taken]], [b"never written"])
    assert taken.read_bytes() == b"someone else's"


def test_names_are_claimed_where_there_are_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*_: Any, **__: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")  # what FAT and exFAT answer

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a2").write_bytes(b"someone else's")
    candidates = [[tmp_path / "a1", tmp_path / "a2"], [tmp_path / "b1", tmp_path / "b2"]]

    assert write_new(candidates, [b"one", b"two"]) == candidates[1]
    assert (tmp_path / "b2").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a2", "b1", "b2"]
    with pytest.raises(FileExistsError):
        write_text_atomic(tmp_path / "a2", "never written", overwrite=False)
    assert (tmp_path / "a2").read_bytes() == b"someone else's"


def test_concurrent_exports_to_one_path_one_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    TuningStore().put("abc123", _fake_tuning_entry())
    out, go = tmp_path / "profile.yaml", tmp_path / "go"
    children = [_start("_child_export", str(out), "abc123", str(go)) for _ in range(6)]
    _go(children, go)
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        results.append((child.returncode, stdout, stderr))

    assert sorted(code for code, _, _ in results) == [0, 2, 2, 2, 2, 2], results
    for code, _, stderr in results:
        if code == 2:
            assert stderr == (
                f"autoquant: error: {out} exists: pick another --out (it is never overwritten)\n"
            )
    assert out.read_text().startswith("# autoquant: the tuning of builtin:tiny-sd")
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize(
    ("kind", "kill"),
    [("file", signal.SIGKILL), ("file", signal.SIGTERM), ("built-in", signal.SIGKILL)],
)
def test_a_killed_writers_temporary_is_removed_by_the_next_writer(
    kind: str, kill: signal.Signals, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models"
    child = _start("_child_killed_mid_write", kind, str(folder))
    assert child.stdout is not None and child.stdout.readline() == "writing\n", child.stderr
    child.send_signal(kill)
    child.wait(timeout=60)  # reaped: a zombie would still count as alive
    assert len(_temporaries(folder)) == 1

    if kind == "file":
        write_text_atomic(folder / "next.json", "{}")
        assert sorted(p.name for p in folder.iterdir()) == ["next.json"]
    else:
        monkeypatch.setattr(
            materialize_module,
            "write_builtin",
            lambda spec, folder, **_: (folder / "model_index.json").write_text("{}"),
        )
        built = materialize_module.materialize(_tiny_sd(), progress=False)
        assert [p.name for p in folder.iterdir()] == [built.name]


def test_a_live_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    target, go = tmp_path / "slow.bin", tmp_path / "go"
    child = _start("_child_slow_writer", str(target), str(go))
    assert child.stdout is not None and child.stdout.readline() == "writing\n", child.stderr
    [in_progress] = _temporaries(tmp_path)

    write_text_atomic(tmp_path / "fast.json", "{}")
    with atomic_dir(tmp_path / "folder") as folder:
        (folder / "file").touch()

    assert _temporaries(tmp_path) == [in_progress]
    go.touch()
    assert child.wait(timeout=60) == 0
    assert target.read_bytes() == b"first half, second half"
    assert _temporaries(tmp_path) == []


def test_only_this_machines_dead_writers_are_removed(tmp_path: Path) -> None:
    machine, boot = fsutil._writer_scope()
    other = "0123abcd" if machine != "0123abcd" else "abcd0123"
    live = os.getpid()
    kept = [
        f".model.aq-{machine}-{boot}-{live}-00000000.tmp",  # this very process
        f".model.aq-{other}-{boot}-999999999-00000000.tmp",  # another machine's: cannot tell
        ".model.a1b2c3d4.tmp",  # not named by autoquant's writers: no pid to judge
    ]
    removed = [
        f".model.aq-{machine}-{other}-{live}-00000000.tmp",  # an earlier boot's
        f".model.aq-{machine}-{boot}-999999999-00000000.tmp",  # a pid with no process
    ]
    for name in kept + removed:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").touch()

    write_text_atomic(tmp_path / "next.json", "{}")

    assert _temporaries(tmp_path) == sorted(kept)


@pytest.mark.parametrize(
    ("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_modes_follow_the_umask(
    mask: int, file_mode: int, folder_mode: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(outputs, "report_markdown", _short_markdown)
    monkeypatch.setattr(
        materialize_module,
        "write_builtin",
        lambda spec, folder, **_: (folder / "model_index.json").write_text("{}"),
    )
    TuningStore().put("abc123", _fake_tuning_entry())
    with _umask(mask):
        run = outputs.write_run(tmp_path / "out", Image.new("RGB", (2, 2)), {"model": "m"})
        assert main(["cache", "export", "abc123", "--out", str(tmp_path / "profile.yaml")]) == 0
        model = materialize_module.materialize(_tiny_sd(), progress=False)

    files = [*run.values(), tmp_path / "profile.yaml", model / "model_index.json"]
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: file_mode for p in files}
    assert model.stat().st_mode & 0o777 == folder_mode
