"""What a tuning decision depends on (its key) and what is remembered of a run (its entry).
The store (autoquant/store/tuning_store.py) keeps them as plain JSON."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoquant.execute.lora import LoraFile, lora_key

if TYPE_CHECKING:
    from autoquant.execute.ladder import Result
    from autoquant.planner.plan import Plan
    from autoquant.probe.types import HardwareProfile


@dataclass(frozen=True)
class TuningKey:
    """What a tuning decision depends on; any change re-tunes."""

    fields: dict[str, Any]

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.fields, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# An out-of-memory outcome is retried once this much more memory is free than when it happened
# (another process may have held the memory then).
_OOM_RETRY_FREE_FACTOR = 1.05


def torch_and_diffusers_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def tuning_key(
    profile: HardwareProfile, plan: Plan, model_identity: str, lora: Sequence[LoraFile] = ()
) -> TuningKey:
    """The key of a tuning decision. A run with LoRAs keys on their files too: they can change
    which tier builds (one that cannot take them fails), so a decision made without them is
    not replayed with them. A run without keeps the key it had before LoRAs were taken."""
    gpu = profile.primary_gpu if profile.has_gpu else None
    settings = json.dumps(plan.settings, sort_keys=True, default=str)
    return TuningKey(
        {
            **({"lora": lora_key(lora)} if lora else {}),
            "accelerator": profile.accelerator,
            "gpu": gpu.name if gpu else None,
            "vram_total_bytes": gpu.total_bytes if gpu else None,
            "gpu_count": len(profile.gpus) if profile.has_gpu else 0,
            "driver": profile.driver,
            "compute_capability": gpu.compute_capability if gpu else None,
            "ram_total_bytes": profile.ram_total_bytes,
            "cpu": None if gpu else profile.cpu.model,
            "versions": {
                **torch_and_diffusers_versions(),
                **{name: status.version for name, status in sorted(profile.backends.items())},
            },
            "model": plan.model,
            "model_identity": model_identity,
            "width": plan.request.width,
            "height": plan.request.height,
            "batch": plan.request.batch,
            "settings": hashlib.sha256(settings.encode()).hexdigest()[:16],
        }
    )


def free_bytes(profile: HardwareProfile) -> int:
    """Memory free for a plan on the machine now: the GPU's free memory (the cap under
    --vram-limit), else available RAM."""
    gpu = profile.primary_gpu
    return gpu.free_bytes if profile.has_gpu and gpu else profile.ram_available_bytes


def entry_for(key: TuningKey, result: Result, previous: dict[str, Any] | None) -> dict[str, Any]:
    """What to remember of a run: every tier's outcome (old OOMs kept) with the memory free when
    it happened, and the chosen figures."""
    outcomes = {o["label"]: o for o in (previous or {}).get("outcomes", [])}
    free = free_bytes(result.profile)
    for attempt in result.attempts:
        if attempt.outcome == "skipped" and attempt.label in outcomes:
            continue  # skipped for an earlier OOM: keep when that happened
        outcomes[attempt.label] = {
            "label": attempt.label,
            "backend": attempt.backend,
            "precision": attempt.precision,
            "free_bytes": free,
            "outcome": attempt.outcome,
            "error": attempt.error,
        }
    chosen = result.chosen
    return {
        "key": key.fields,
        "model": result.plan.model,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chosen": {**chosen.to_dict(), "label": chosen.label},
        "outcomes": list(outcomes.values()),
        "measured": result.report()["measured"],
    }


def known_oom(entry: dict[str, Any], free_now: int) -> set[str]:
    """The tiers that ran out of memory here with no less memory free than now: skip them. One
    that ran out while less was free (another process held memory) is tried again."""
    return {
        o["label"]
        for o in entry.get("outcomes", [])
        if o.get("outcome") == "oom"
        and free_now <= o.get("free_bytes", free_now) * _OOM_RETRY_FREE_FACTOR
    }


def saved_index(entry: dict[str, Any], plan: Plan) -> int | None:
    """Where the saved tier sits in this plan's ladder, if it is still there."""
    saved = entry.get("chosen", {})
    for index, planned in enumerate(plan.ladder):
        if planned.label == saved.get("label") and planned.device_map == saved.get("device_map"):
            return index
    return None


def export_profile(entry: dict[str, Any]) -> str:
    """A YAML profile that makes the same decision on another machine of the same kind."""
    import yaml

    chosen = entry["chosen"]
    key = entry["key"]
    text_encoders = [c for c in chosen["components"] if c.startswith("text_encoder")]
    hardware: dict[str, Any] = {"device": "cpu" if key["accelerator"] == "cpu" else "cuda"}
    if key.get("vram_total_bytes"):
        hardware["vram"] = f"{key['vram_total_bytes'] / 2**20:.0f}MiB"
        hardware["compute_capability"] = key.get("compute_capability")
    profile = {
        "hardware": hardware,
        "request": {"width": key["width"], "height": key["height"], "batch": key["batch"]},
        "force": {
            "backend": chosen["backend"],
            "precision": chosen["precision"],
            "memory_options": list(chosen["memory_options"]),
        },
        "components": {"quantize_text_encoders": "always" if text_encoders else "never"},
        # Entries written before compiled tiers existed have no "compiled": eager.
        "planner": {"compile": "always" if chosen.get("compiled") else "never"},
    }
    header = (
        f"# autoquant: the tuning of {entry['model']} on {key.get('gpu') or key.get('cpu')}\n"
        f"# (chosen {chosen['label']}, {entry['updated']}). Use with --profile FILE.\n"
    )
    return header + yaml.safe_dump(profile, sort_keys=False)
