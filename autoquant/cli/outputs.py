"""Writing a run's image and reports into the output folder, never over existing files."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoquant.core.fsutil import write_new
from autoquant.core.units import format_bytes

_NAMES = ("image.png", "report.json", "report.md")


def free_names(out: Path) -> Iterator[list[Path]]:
    """image.png / report.json / report.md in ``out``, then their -2, -3, … variants: the sets
    a run may take, in order, passing over those of which any file exists. Only claiming one
    (write_run) makes it the run's: another run may take it first."""
    for counter in itertools.count(1):
        suffix = "" if counter == 1 else f"-{counter}"
        names = [out / _with_suffix(name, suffix) for name in _NAMES]
        if not any(name.exists() for name in names):
            yield names


def _with_suffix(name: str, suffix: str) -> str:
    stem, ext = name.split(".")
    return f"{stem}{suffix}.{ext}"


def write_run(out: Path, image: Any, report: dict[str, Any]) -> dict[str, Path]:
    """Write the run's three files under the first free set of names: an earlier run's files,
    or those of a run writing into ``out`` at the same time, are never overwritten, and the
    three always share one suffix."""
    png = io.BytesIO()
    image.save(png, format="PNG")
    contents = [
        png.getvalue(),
        (json.dumps(report, indent=2, default=str) + "\n").encode(),
        report_markdown(report).encode(),
    ]
    image_path, report_json, report_md = write_new(free_names(out), contents)
    return {"image": image_path, "report_json": report_json, "report_md": report_md}


def _size(value: Any) -> str:
    return format_bytes(value) if isinstance(value, (int, float)) else "—"


def _seconds(value: Any) -> str:
    return f"{value:.3f} s" if isinstance(value, (int, float)) else "—"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md. Each figure is named for what it is (Result.report): the generation's own step
    time apart from the smoke test's, and the estimated peak in the measured peak's scope, with
    what the device needs besides named separately."""
    chosen = report["chosen"]
    measured, estimate = report["measured"], report["estimate"]
    generation = report.get("generation") or {}
    probe = report["probe"]
    gpus = probe.get("gpus") or []
    device = gpus[0]["name"] if gpus and probe["accelerator"] != "cpu" else probe["cpu"]["model"]
    lines = [
        f"# autoquant run: {report['model']}",
        "",
        f"- Machine: {probe['accelerator']} — {device}",
        f"- Chosen: **{chosen['label']}** ({chosen['description']})",
        *(
            f"- LoRA `{lora['path']}` at scale {lora['scale']:g}: {lora['note']}"
            for lora in report.get("lora") or ()
        ),
        f"- Generation: {generation.get('steps', '—')} steps at "
        f"{generation.get('width', '—')}x{generation.get('height', '—')}, "
        f"step: {_seconds(generation.get('step_seconds'))}, "
        f"in all: {_seconds(generation.get('seconds'))}",
        f"- Predicted: {_seconds((report.get('predicted') or {}).get('seconds'))} "
        f"({chosen.get('fidelity')} class, --optimize {chosen.get('objective')})",
        f"- Smoke test: step: {_seconds(measured.get('smoke_step_seconds'))}, "
        f"in all: {_seconds(measured.get('smoke_seconds'))}; "
        f"load: {_seconds(measured.get('load_seconds'))}",
        f"- Peak memory ({measured.get('peak_scope')}, load + smoke test): "
        f"measured {_size(measured.get('peak_bytes'))}, "
        f"estimated {_size(estimate.get('peak_bytes'))}; "
        f"after load: {_size(measured.get('weights_bytes'))}",
        f"- Estimated need: {_size(estimate.get('required_bytes'))} = "
        f"{_size(estimate.get('allocator_peak_bytes'))} allocator peak + "
        f"{_size(estimate.get('overhead_bytes'))} {estimate.get('overhead')}",
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
