"""The latency model and the memory estimate against what runs measured: for every run report
given, the tier it ran is priced and estimated again with the code as it is now, and set beside
the run's measured generation seconds and peak.

    python3 scripts/latency_check.py REPORT.json... [--markdown OUT.md]

A report is an `autoquant run --json` report (scripts/gpu_speed.sh writes them), an `autoquant
bench` bench.json (every tier that ran, its end-to-end generation against the prediction; compiled
tiers left out, the latency model prices eager runs), or a scripts/cpu_choice.py result
(cpu-choice.json), whose rows name the tier by backend, precision, compute dtype and memory
options: their quantized components are the denoiser alone, as the planner builds a CPU tier that
fits without quantizing the text encoders. The targets (issue "Tune for speed"): predicted seconds
within ±25% of measured, estimated peak within ±10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoquant.backends import UNQUANTIZED
from autoquant.backends.tier import Tier
from autoquant.models import inventory, resolve
from autoquant.models.types import ModelInventory
from autoquant.planner.estimate import Request, estimate
from autoquant.planner.latency import predict
from autoquant.probe.types import CpuInfo, HardwareProfile

SECONDS_TARGET = 0.25
PEAK_TARGET = 0.10


def _inventory(model: str, cache: dict[str, ModelInventory]) -> ModelInventory:
    if model not in cache:
        cache[model] = inventory(resolve(model))
    return cache[model]


def _row(
    name: str,
    inv: ModelInventory,
    tier: Tier,
    request: Request,
    profile: HardwareProfile,
    measured_seconds: float,
    measured_peak: int | None,
    peak_in_allocator: bool,
) -> dict[str, Any]:
    est = estimate(inv, tier, request, on_gpu=profile.has_gpu)
    latency = predict(inv, tier, request, est, profile)
    predicted = latency.seconds if latency else None
    estimated_peak = (
        max(est.peak_bytes, est.load_peak_bytes) if peak_in_allocator else est.required_bytes
    )
    return {
        "run": name,
        "tier": tier.label,
        "predicted_s": predicted,
        "measured_s": measured_seconds,
        "seconds_error": predicted / measured_seconds - 1 if predicted else None,
        "estimated_peak": estimated_peak,
        "measured_peak": measured_peak,
        "peak_error": estimated_peak / measured_peak - 1 if measured_peak else None,
    }


def _from_run_report(
    path: Path, report: dict[str, Any], cache: dict[str, ModelInventory]
) -> dict[str, Any]:
    tier = Tier.from_dict(report["chosen"])
    generation = report["generation"]
    request = Request(generation["width"], generation["height"], 1, generation["steps"])
    profile = HardwareProfile.from_dict(report["probe"])
    measured = report["measured"]
    # Out-of-memory recovery may have switched options on after the plan (report "adjustments"):
    # the run then measured another tier than the one priced, and says so.
    name = path.stem + (" (adjusted after OOM)" if report.get("adjustments") else "")
    return _row(
        name,
        _inventory(report["model"], cache),
        tier,
        request,
        profile,
        generation["seconds"],
        measured.get("peak_bytes"),
        measured.get("peak_scope") == "allocator",
    )


def _from_bench(
    path: Path, bench: dict[str, Any], cache: dict[str, ModelInventory]
) -> Iterator[dict[str, Any]]:
    inv = _inventory(bench["model"], cache)
    req = bench["request"]
    request = Request(req["width"], req["height"], req["batch"], req["steps"])
    profile = HardwareProfile.from_dict(bench["probe"])
    on_gpu = profile.has_gpu
    for record in bench["tiers"]:
        if record["status"] != "ok" or record.get("compile") or not record.get("e2e_seconds"):
            continue
        peak = max(record.get("peak_bytes") or 0, record.get("load_peak_bytes") or 0)
        yield _row(
            f"{path.parent.name}/{record['spec']}",
            inv,
            Tier.from_dict(record["tier"]),
            request,
            profile,
            record["e2e_seconds"],
            peak or None,
            on_gpu,  # the bench reads the CUDA allocator's peaks on a GPU
        )


def _from_cpu_choice(
    path: Path, result: dict[str, Any], cache: dict[str, ModelInventory]
) -> Iterator[dict[str, Any]]:
    inv = _inventory(result["args"]["model"], cache)
    width, _, height = result["args"]["size"].partition("x")
    request = Request(int(width), int(height), 1, int(result["args"]["steps"]))
    profile = _cpu_choice_host(result["host"])
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for row in result["rows"]:
        if row["round"] > 0 and row["returncode"] == 0:
            by_entry.setdefault(row["entry"], []).append(row)
    for entry, rows in by_entry.items():
        chosen = rows[0]["chosen"]
        quantized = () if chosen["backend"] == UNQUANTIZED else (inv.denoiser.name,)
        tier = Tier(
            chosen["backend"],
            chosen["precision"],
            chosen["compute_dtype"],
            quantized,
            tuple(chosen["memory_options"]),
        )
        yield _row(
            f"{path.parent.name}/{entry}",
            inv,
            tier,
            request,
            profile,
            statistics.median(r["generation_seconds"] for r in rows),
            max(r["peak_bytes"] for r in rows if r.get("peak_bytes")),
            False,
        )


def _cpu_choice_host(host: dict[str, Any]) -> HardwareProfile:
    """The CPU machine a cpu_choice.py result was measured on, from the host facts it recorded
    (not the machine this script runs on: CPU kinds differ between machines). Files written
    before avx512f was recorded imply it by avx512_bf16 or amx_bf16, which it comes with."""
    flags = [flag for flag, present in host["flags"].items() if present]
    if {"avx512_bf16", "amx_bf16"} & set(flags):
        flags.append("avx512f")
    ram = int(host["ram_bytes"])
    return HardwareProfile(
        accelerator="cpu",
        gpus=(),
        driver=None,
        ram_total_bytes=ram,
        ram_available_bytes=ram,
        cpu=CpuInfo(host["cpu"], int(host["usable_cores"]), tuple(sorted(set(flags)))),
        disk_free_bytes=0,
    )


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "–"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | tier | predicted s | measured s | error | est. peak GB | peak GB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['tier']} | {_cell(r['predicted_s'], '.2f')} | "
            f"{r['measured_s']:.2f} | {_cell(r['seconds_error'], '+.0%')} | "
            f"{_cell(r['estimated_peak'] / 1e9, '.2f')} | "
            f"{_cell(r['measured_peak'] / 1e9 if r['measured_peak'] else None, '.2f')} | "
            f"{_cell(r['peak_error'], '+.0%')} |"
        )
    timed = [r for r in rows if r["seconds_error"] is not None]
    within = sum(abs(r["seconds_error"]) <= SECONDS_TARGET for r in timed)
    peaks = [r for r in rows if r["peak_error"] is not None]
    peak_within = sum(abs(r["peak_error"]) <= PEAK_TARGET for r in peaks)
    lines += [
        "",
        f"Seconds within ±{SECONDS_TARGET:.0%}: {within} of {len(timed)}; "
        f"peaks within ±{PEAK_TARGET:.0%}: {peak_within} of {len(peaks)}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    cache: dict[str, ModelInventory] = {}
    rows: list[dict[str, Any]] = []
    for path in args.reports:
        data = json.loads(path.read_text())
        if "rows" in data:
            rows.extend(_from_cpu_choice(path, data, cache))
        elif "tiers" in data and "budgets" in data:
            rows.extend(_from_bench(path, data, cache))
        elif data.get("generation"):
            rows.append(_from_run_report(path, data, cache))
    table = markdown(rows)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
