"""Is `autoquant run` with no tier forced as fast, on this CPU, as the fastest tier one could force?

    .venv/bin/python scripts/cpu_choice.py --out DIR [--steps 3] [--size 512x512] [--rounds 2]
        [--tiers none:bf16,none:fp32,gguf:q8_0,gguf:q5_1,torchao:int8] [--model builtin:sd15]
        [--force]

Runs `python -m autoquant run --json --retune` once for the "auto" entry (no --backend) and once
per forced tier (--backend B --precision P), each as its own process, every round, with the order
rotated from round to round so that background load is spread over the entries. One untimed
one-step auto run comes first, to materialize the model in the user's AUTOQUANT_CACHE_DIR. The
figure compared is the report's generation seconds (the real generation, not the smoke test):
the median of the rounds per entry. OMP_NUM_THREADS and the cache are left as they are, so this
measures the machine's real speed.

Writes DIR/cpu-choice.json (every run, the host) and DIR/cpu-choice.md (a table and the verdict:
auto's median within 1.2x of the fastest forced tier's, PASS or FAIL). Exits 1 if an auto run
failed, 2 if DIR already holds cpu-choice.json (unless --force), else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

THRESHOLD = 1.2
RESULT_JSON = "cpu-choice.json"
RESULT_MD = "cpu-choice.md"
AUTO = "auto"
DEFAULT_TIERS = "none:bf16,none:fp32,gguf:q8_0,gguf:q5_1,torchao:int8"
# What sets the latency calibration's CPU kind (planner/latency.py cpu_kind) and bf16 units.
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")
GIB = 2**30


@dataclass(frozen=True)
class Entry:
    """One thing measured: the planner's own choice, or one forced tier."""

    name: str
    backend: str | None = None
    precision: str | None = None

    def flags(self) -> list[str]:
        if self.backend is None or self.precision is None:
            return []
        return ["--backend", self.backend, "--precision", self.precision]


@dataclass
class Row:
    """One `autoquant run` process and what its report said."""

    entry: str
    round: int  # 0 is the untimed warm-up
    position: int  # its place in the round's order
    returncode: int
    wall_seconds: float
    max_rss_bytes: int  # the process's resident-set peak over the whole run (wait4)
    generation_seconds: float | None = None
    step_seconds: float | None = None
    chosen: dict[str, Any] | None = None
    peak_bytes: int | None = None  # the report's measured peak (load + smoke test)
    peak_scope: str | None = None
    error: str | None = None


def parse_tier(text: str) -> Entry:
    backend, sep, precision = text.strip().partition(":")
    if not sep or not backend or not precision:
        raise argparse.ArgumentTypeError(f"tier {text!r} must be BACKEND:PRECISION")
    return Entry(f"{backend}:{precision}", backend, precision)


def parse_tiers(text: str) -> list[Entry]:
    entries = [parse_tier(part) for part in text.split(",") if part.strip()]
    if not entries:
        raise argparse.ArgumentTypeError("--tiers names no tier")
    return entries


def parse_size(text: str) -> str:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 512x512")
    return f"{int(width)}x{int(height)}"


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--model", default="builtin:sd15")
    parser.add_argument("--size", type=parse_size, default="512x512", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=positive, default=3, help="denoising steps per run")
    parser.add_argument("--rounds", type=positive, default=2, help="runs of each entry")
    parser.add_argument(
        "--tiers", type=parse_tiers, default=DEFAULT_TIERS, help="BACKEND:PRECISION,…"
    )
    parser.add_argument("--force", action="store_true", help=f"overwrite an existing {RESULT_JSON}")
    return parser


def run_command(model: str, size: str, steps: int, entry: Entry, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "autoquant",
        "run",
        "-m",
        model,
        "--size",
        size,
        "--steps",
        str(steps),
        "--json",
        "--retune",
        "--out",
        out,
        *entry.flags(),
    ]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no stderr)"


def run_once(command: list[str]) -> tuple[int, float, int, str, str]:
    """Run ``command`` to its end: exit status, wall seconds, the child's max RSS in bytes, its
    stdout and its stderr. os.wait4 gives that one child's resource usage."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        pid = os.posix_spawn(
            command[0],
            command,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdout.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, stderr.fileno(), 2),
            ],
        )
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024, out, err


def measure(args: argparse.Namespace, entry: Entry, steps: int, round_: int, position: int) -> Row:
    with tempfile.TemporaryDirectory(prefix="cpu-choice-") as out:
        code, wall, rss, stdout, stderr = run_once(
            run_command(args.model, args.size, steps, entry, out)
        )
    row = Row(entry.name, round_, position, code, wall, rss)
    if code != 0:
        row.error = last_line(stderr)
        return row
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError as err:
        row.error = f"report is not JSON: {err}"
        return row
    chosen = report["chosen"]
    row.generation_seconds = report["generation"]["seconds"]
    row.step_seconds = report["generation"]["step_seconds"]
    row.chosen = {
        key: chosen[key]
        for key in ("backend", "precision", "compute_dtype", "label", "memory_options")
    }
    row.peak_bytes = report["measured"]["peak_bytes"]
    row.peak_scope = report["measured"]["peak_scope"]
    return row


def progress(row: Row) -> None:
    what = "warm-up" if row.round == 0 else f"round {row.round}"
    if row.error is not None:
        result = f"FAILED (exit {row.returncode}): {row.error}"
    else:
        chosen = row.chosen or {}
        result = (
            f"generation {row.generation_seconds:.2f} s, chose {chosen.get('label')}, "
            f"process {row.wall_seconds:.1f} s"
        )
    print(f"[{what}] {row.entry}: {result}", file=sys.stderr, flush=True)


def cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo (empty where it is missing)."""
    name = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return name, flags


def ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def git_commit() -> str | None:
    """HEAD of the checkout this script sits in (read only; uncommitted edits are not shown)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def host_facts() -> dict[str, Any]:
    name, flags = cpuinfo()
    versions: dict[str, str | None] = {}
    for package in ("torch", "diffusers", "autoquant-diffusers", "gguf", "torchao"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "ram_bytes": ram_bytes(),
        "python": platform.python_version(),
        "versions": versions,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "git_commit": git_commit(),
    }


def summarize(entries: list[Entry], rows: list[Row]) -> dict[str, Any]:
    """Per entry: its medians and choices; then auto against the fastest forced tier."""
    timed = [row for row in rows if row.round > 0]
    per_entry: dict[str, dict[str, Any]] = {}
    for entry in entries:
        mine = [row for row in timed if row.entry == entry.name]
        seconds = [row.generation_seconds for row in mine if row.generation_seconds is not None]
        choices = sorted(
            {
                (row.chosen["backend"], row.chosen["precision"], row.chosen["compute_dtype"])
                for row in mine
                if row.chosen is not None
            }
        )
        per_entry[entry.name] = {
            "median_seconds": statistics.median(seconds) if seconds else None,
            "rounds_seconds": [row.generation_seconds for row in mine],
            "choices": [list(choice) for choice in choices],
            "errors": [row.error for row in mine if row.error is not None],
        }
    forced = {
        name: data["median_seconds"]
        for name, data in per_entry.items()
        if name != AUTO and data["median_seconds"] is not None
    }
    fastest = min(forced, key=lambda name: forced[name]) if forced else None
    auto = per_entry[AUTO]["median_seconds"]
    ratio = auto / forced[fastest] if auto is not None and fastest is not None else None
    forced_tiers = {(e.backend, e.precision): e.name for e in entries if e.name != AUTO}
    matches = sorted(
        {forced_tiers.get((b, p)) or "none of them" for b, p, _ in per_entry[AUTO]["choices"]}
    )
    for data in per_entry.values():
        median = data["median_seconds"]
        data["ratio_to_fastest_forced"] = (
            median / forced[fastest] if median is not None and fastest is not None else None
        )
    return {
        "entries": per_entry,
        "fastest_forced": fastest,
        "auto_matches_forced": matches,
        "ratio": ratio,
        "threshold": THRESHOLD,
        "verdict": "PASS" if ratio is not None and ratio <= THRESHOLD else "FAIL",
    }


def gib(value: int | None) -> str:
    return f"{value / GIB:.2f} GiB" if value is not None else "n/a"


def seconds(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "failed"


def markdown(result: dict[str, Any], entries: list[Entry], rows: list[Row]) -> str:
    host, summary, args = result["host"], result["summary"], result["args"]
    flags = ", ".join(
        f"{flag} {'yes' if present else 'no'}" for flag, present in host["flags"].items()
    )
    lines = [
        "# Auto choice vs forced tiers on this CPU",
        "",
        f"- machine: {host['cpu']}, {host['cores']} cores ({host['usable_cores']} usable), "
        f"{flags}, RAM {gib(host['ram_bytes'])}",
        f"- torch {host['versions']['torch']}, diffusers {host['versions']['diffusers']}, "
        f"Python {host['python']}, OMP_NUM_THREADS {host['omp_num_threads'] or 'unset'}, "
        f"commit {host['git_commit'] or 'unknown'} (plus any uncommitted edits)",
        f"- command: `{result['command']}`",
        f"- each run: `{result['run_command']}` (forced entries add `--backend B --precision P`)",
        f"- {args['model']} at {args['size']}, {args['steps']} steps, {args['rounds']} round(s), "
        "order rotated each round; generation s is the report's `generation.seconds`",
        "",
        f"| entry | chose | generation s (median of {args['rounds']}) | each round | "
        "peak RSS or memory if reported | ratio to fastest forced |",
        "|---|---|---|---|---|---|",
    ]
    for entry in entries:
        data = summary["entries"][entry.name]
        mine = [row for row in rows if row.entry == entry.name and row.round > 0]
        chose = "; ".join(f"{b} {p} ({c})" for b, p, c in data["choices"]) or "—"
        if entry.name == AUTO and summary["auto_matches_forced"]:
            chose += f" = {', '.join(summary['auto_matches_forced'])}"
        if data["errors"]:
            chose += f"; failed: {data['errors'][-1]}"
        peaks = [row.peak_bytes for row in mine if row.peak_bytes is not None]
        rss = [row.max_rss_bytes for row in mine if row.error is None]
        memory = (
            f"report {gib(max(peaks) if peaks else None)} (load + smoke); "
            f"process max RSS {gib(max(rss) if rss else None)}"
        )
        ratio = data["ratio_to_fastest_forced"]
        lines.append(
            f"| {entry.name} | {chose} | {seconds(data['median_seconds'])} | "
            f"{' / '.join(seconds(s) for s in data['rounds_seconds'])} | {memory} | "
            f"{f'{ratio:.2f}' if ratio is not None else 'n/a'} |"
        )
    auto = summary["entries"][AUTO]["median_seconds"]
    fastest = summary["fastest_forced"]
    fastest_s = summary["entries"][fastest]["median_seconds"] if fastest else None
    ratio = summary["ratio"]
    lines += [
        "",
        f"auto {seconds(auto)} s / fastest forced ({fastest or 'none'}) {seconds(fastest_s)} s = "
        f"{f'{ratio:.3f}' if ratio is not None else 'n/a'}: **{summary['verdict']}** "
        f"(threshold {THRESHOLD})",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it 0600
    os.replace(handle.name, path)


def main() -> int:
    args = build_parser().parse_args()
    if (args.out / RESULT_JSON).exists() and not args.force:
        print(f"{args.out / RESULT_JSON} exists: pass --force to overwrite it", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    entries = [Entry(AUTO), *args.tiers]
    print(
        f"cpu_choice: warm-up, then {args.rounds} round(s) of {len(entries)} runs",
        file=sys.stderr,
        flush=True,
    )
    rows = [measure(args, entries[0], 1, 0, 0)]
    progress(rows[-1])
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(entries)
        for position, entry in enumerate(entries[shift:] + entries[:shift]):
            rows.append(measure(args, entry, args.steps, round_, position))
            progress(rows[-1])
    result: dict[str, Any] = {
        "command": shlex.join(sys.orig_argv),
        "run_command": shlex.join(
            run_command(args.model, args.size, args.steps, entries[0], "<tmpdir>")
        ),
        "args": {
            "model": args.model,
            "size": args.size,
            "steps": args.steps,
            "rounds": args.rounds,
            "tiers": [entry.name for entry in args.tiers],
        },
        "host": host_facts(),
        "rows": [asdict(row) for row in rows],
    }
    result["summary"] = summarize(entries, rows)
    write_atomic(args.out / RESULT_JSON, json.dumps(result, indent=2) + "\n")
    table = markdown(result, entries, rows)
    write_atomic(args.out / RESULT_MD, table)
    print(table, end="")
    auto_failed = any(row.entry == AUTO and row.error is not None for row in rows if row.round > 0)
    return 1 if auto_failed else 0


if __name__ == "__main__":
    sys.exit(main())
