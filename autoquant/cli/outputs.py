"""Writing a run's image and reports into the output folder, never over existing files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoquant.core.fsutil import atomic_file, write_text_atomic
from autoquant.core.units import format_bytes

_NAMES = ("image.png", "report.json", "report.md")


def free_names(out: Path) -> dict[str, Path]:
    """image.png / report.json / report.md in ``out``, or -2, -3, … variants of all three when
    any of them exists: an earlier run's files are never overwritten."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = ""
    counter = 1
    while any((out / _with_suffix(n, suffix)).exists() for n in _NAMES):
        counter += 1
        suffix = f"-{counter}"
    image, report_json, report_md = (out / _with_suffix(n, suffix) for n in _NAMES)
    return {"image": image, "report_json": report_json, "report_md": report_md}


def _with_suffix(name: str, suffix: str) -> str:
    stem, ext = name.split(".")
    return f"{stem}{suffix}.{ext}"


def write_run(out: Path, image: Any, report: dict[str, Any]) -> dict[str, Path]:
    paths = free_names(out)
    with atomic_file(paths["image"], "wb") as handle:
        image.save(handle, format="PNG")
    write_text_atomic(paths["report_json"], json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(paths["report_md"], report_markdown(report))
    return paths


def _size(value: Any) -> str:
    return format_bytes(value) if isinstance(value, (int, float)) else "—"


def _seconds(value: Any) -> str:
    return f"{value:.3f} s" if isinstance(value, (int, float)) else "—"


def report_markdown(report: dict[str, Any]) -> str:
    chosen = report["chosen"]
    measured = report["measured"]
    probe = report["probe"]
    gpus = probe.get("gpus") or []
    device = gpus[0]["name"] if gpus and probe["accelerator"] != "cpu" else probe["cpu"]["model"]
    lines = [
        f"# autoquant run: {report['model']}",
        "",
        f"- Machine: {probe['accelerator']} — {device}",
        f"- Chosen: **{chosen['label']}** ({chosen['description']})",
        f"- Estimated need: {_size(measured.get('estimate_bytes'))}; "
        f"measured peak: {_size(measured.get('peak_bytes'))}; "
        f"after load: {_size(measured.get('weights_bytes'))}",
        f"- Load: {_seconds(measured.get('load_seconds'))}; "
        f"step: {_seconds(measured.get('step_seconds'))}; "
        f"generation: {_seconds(report.get('generation_seconds'))}",
        "",
        "## Tiers tried",
        "",
        "| tier | outcome | phase | error |",
        "|---|---|---|---|",
    ]
    for attempt in report["tried"]:
        error = (attempt.get("error") or "").replace("|", "/")
        phase = attempt.get("phase") or ""
        lines.append(f"| {attempt['label']} | {attempt['outcome']} | {phase} | {error} |")
    lines += ["", "## Why", ""]
    lines += [f"- {step}" for step in report["plan"]["path"]]
    for title, key in (("Warnings", "warnings"), ("Changed after tuning", "adjustments")):
        if report.get(key):
            lines += ["", f"## {title}", ""] + [f"- {w}" for w in report[key]]
    return "\n".join(lines) + "\n"
