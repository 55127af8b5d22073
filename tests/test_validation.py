"""Bad input is a one-line error and exit 2 before any heavy import or work, and writes nothing:
arguments are checked by their types (cli/args.py), the rest by cli/validate.py before a command
runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_cli import aq, one_line_error

from autoquant.cli.main import build_parser, main
from autoquant.cli.validate import folder_problem

HEAVY = ("torch", "diffusers", "transformers")
# main() in a fresh interpreter, then the heavy modules it had imported by the time it returned.
_MAIN_THEN_MODULES = f"""
import sys
from autoquant.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(sorted(set({HEAVY!r}) & set(sys.modules)))
sys.exit(code)
"""


def aq_light(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """The command run by main() in a subprocess, printing which heavy modules it imported."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", AUTOQUANT_CACHE_DIR=str(cache))
    return subprocess.run(
        [sys.executable, "-c", _MAIN_THEN_MODULES, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _garbage_model(tmp_path: Path) -> Path:
    folder = tmp_path / "garbage-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    return folder


def _existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("keep me\n")
    return path


# The must-show cases: (id, the `run` arguments made in a tmp folder, expected text);
# --out is a tmp folder unless the case names its own.
MUST_SHOW: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("seed-not-a-number", lambda tmp: ["--seed", "x"], "--seed: 'x' must be a whole number"),
    ("size-0x0", lambda tmp: ["--size", "0x0"], "size '0x0': width and height must each be"),
    ("out-is-etc-passwd", lambda tmp: ["--out", "/etc/passwd"], "/etc/passwd is not a folder"),
    ("out-is-a-file", lambda tmp: ["--out", str(_existing_file(tmp))], "is not a folder"),
    (
        "garbage-model-index",
        lambda tmp: ["--model", str(_garbage_model(tmp))],
        "model_index.json is not valid JSON",
    ),
]


@pytest.mark.parametrize(("case", "extra", "expected"), MUST_SHOW, ids=[c[0] for c in MUST_SHOW])
def test_must_show_cases_fail_fast_in_one_line_and_write_nothing(
    tmp_path: Path, case: str, extra: Callable[[Path], list[str]], expected: str
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    arguments = extra(tmp_path)
    if "--out" not in arguments:
        arguments += ["--out", str(out)]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    one_line_error(aq("run", *arguments, cache=cache), expected)
    light = aq_light("run", *arguments, cache=cache)
    one_line_error(light, expected)
    # Reported before torch/diffusers were imported: that import is what took 8-13 s.
    assert light.stdout.strip() == "[]", light.stdout

    assert not out.exists() and not cache.exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--seed", str(2**64)], "from 0 to 18446744073709551615"),
        (["run", "--seed", "-1"], "from 0 to 18446744073709551615"),
        (["run", "--size", "8200x64"], "a multiple of 8 from 8 to 8192"),
        (["run", "--size", "64x0"], "a multiple of 8 from 8 to 8192"),
        (["run", "--smoke-size", "12"], "--smoke-size: '12' must be a multiple of 8"),
        (["run", "--smoke-size", "0"], "--smoke-size: '0' must be a multiple of 8"),
        (["run", "--smoke-size", "16384"], "from 8 to 8192"),
        (["run", "--steps", "5000"], "--steps: '5000' must be a whole number from 1 to 1000"),
        (["plan", "--batch", "0"], "--batch: '0' must be a whole number from 1 to 1024"),
    ],
)
def test_argument_types_reject_out_of_range_values(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_argument_types_accept_the_edges() -> None:
    args = build_parser().parse_args(
        ["run", "--seed", str(2**64 - 1), "--size", "8x8192", "--smoke-size", "8"]
    )
    assert (args.seed, args.size, args.smoke_size) == (2**64 - 1, (8, 8192), 8)


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_out_below_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _existing_file(tmp_path)
    err = _in_process(capsys, "run", "--out", str(blocker / "sub"))
    assert f"--out {blocker / 'sub'}: {blocker} is not a folder" in err
    assert blocker.read_text() == "keep me\n"


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder no file can be created in: a mode-555 one, or, for root (whom permission bits do
    not stop), Linux's /proc/sys, where procfs refuses new files to everyone."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not os.access(folder, os.W_OK):
            yield folder
        elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
            yield Path("/proc/sys")
        else:
            pytest.skip("no folder this user cannot write to")
    finally:
        folder.chmod(0o755)


def test_out_in_a_read_only_folder_is_refused(
    read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _in_process(capsys, "run", "--out", str(read_only_folder / "out"))
    assert f"{read_only_folder} is not writable" in err
    assert not (read_only_folder / "out").exists()


@pytest.mark.parametrize(
    "command",
    [["plan"], ["run"], ["cache", "list"], ["cache", "show", "abc"], ["serve"]],
    ids=" ".join,
)
def test_a_cache_that_is_a_file_is_one_line_naming_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    cache = _existing_file(tmp_path)
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(cache))
    err = _in_process(capsys, *command)
    assert f"cache folder {cache} is unusable ({cache} is not a folder)" in err
    assert "AUTOQUANT_CACHE_DIR" in err


def test_a_read_only_cache_is_one_line(
    read_only_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(read_only_folder / "cache"))
    err = _in_process(capsys, "cache", "list")
    assert f"cache folder {read_only_folder / 'cache'} is unusable" in err
    assert f"{read_only_folder} is not writable" in err


def test_folder_problem(tmp_path: Path) -> None:
    blocker = _existing_file(tmp_path)
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "new" / "deeper") is None  # created later, on demand
    assert folder_problem(blocker) == f"{blocker} is not a folder"
    assert folder_problem(blocker / "x" / "y") == f"{blocker} is not a folder"
    assert list(tmp_path.iterdir()) == [blocker]  # looking created nothing


@pytest.mark.parametrize(
    ("index", "config", "expected"),
    [
        ("{not json", None, "model_index.json is not valid JSON"),
        ("[1, 2]", None, "model_index.json must hold a JSON object"),
        ('{"unet": ["diffusers"]}', None, 'has no "_class_name"'),
        (
            '{"_class_name": "StableDiffusionPipeline", "unet": "UNet2DConditionModel"}',
            None,
            "'unet' must be [library, class name]",
        ),
        (
            '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet"]}',
            "{garbage",
            "unet/config.json is not valid JSON",
        ),
        (
            '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet"]}',
            '"a string"',
            "unet/config.json must hold a JSON object",
        ),
    ],
)
def test_a_broken_model_folder_is_one_line_before_heavy_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    index: str,
    config: str | None,
    expected: str,
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    if config is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(config)
    out = tmp_path / "out"
    for args in (
        ["plan", "--model", str(folder)],
        ["run", "--model", str(folder), "--out", str(out)],
        ["convert", str(folder), "--to", "q8_0"],
    ):
        assert expected in _in_process(capsys, *args)
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("planner.headroom=-1", "'planner.headroom' is -1; it must be a number greater than 0"),
        ("planner.headroom=0", "must be a number greater than 0 and at most 1"),
        ("planner.headroom=1.5", "must be a number greater than 0 and at most 1"),
        ("request.width=0", "'request.width' is 0; it must be a multiple of 8 from 8 to 8192"),
    ],
)
def test_settings_out_of_range_fail_before_heavy_imports(
    tmp_path: Path, setting: str, expected: str
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    for args in (["plan"], ["run", "--out", str(out)]):
        proc = aq_light(*args, "--set", setting, cache=cache)
        one_line_error(proc, expected)
        assert proc.stdout.strip() == "[]", proc.stdout
    assert not cache.exists() and not out.exists()
