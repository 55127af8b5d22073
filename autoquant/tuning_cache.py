"""Remember what worked: tuning outcomes saved per machine, model, versions and settings.

One JSON file (``<cache>/tuning.json``) holds every entry. Writers take an exclusive file lock
and replace the file atomically, so two processes tuning at once never corrupt it or lose each
other's entries. A store that cannot be read is set aside (never deleted) with a warning, and
the run re-tunes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.errors import AutoquantError
from autoquant.fsutil import write_text_atomic
from autoquant.paths import cache_dir

if TYPE_CHECKING:
    from autoquant.executor import Result
    from autoquant.planner.plan import Plan
    from autoquant.probe.types import HardwareProfile

STORE_VERSION = 1
Warn = Callable[[str], None]


def store_path() -> Path:
    return cache_dir() / "tuning.json"


@dataclass(frozen=True)
class TuningKey:
    """What a tuning decision depends on; any change re-tunes."""

    fields: dict[str, Any]

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.fields, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def torch_and_diffusers_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def tuning_key(profile: HardwareProfile, plan: Plan, model_identity: str) -> TuningKey:
    gpu = profile.primary_gpu if profile.has_gpu else None
    settings = json.dumps(plan.settings, sort_keys=True, default=str)
    return TuningKey(
        {
            "accelerator": profile.accelerator,
            "gpu": gpu.name if gpu else None,
            "vram_total_bytes": gpu.total_bytes if gpu else None,
            "driver": profile.driver,
            "compute_capability": gpu.compute_capability if gpu else None,
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


class TuningStore:
    """The store file, read and written under a lock."""

    def __init__(self, path: Path | None = None, warn: Warn | None = None) -> None:
        self.path = path or store_path()
        self._warn = warn or (lambda _m: None)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        """All entries; an unreadable store is moved aside with a warning and reads as empty."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if data.get("version") != STORE_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError("not an autoquant tuning store")
            return dict(data["entries"])
        except (ValueError, AttributeError) as err:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            self._warn(
                f"warning: tuning cache {self.path} is unreadable ({err}); moved it to "
                f"{aside.name} and re-tuning"
            )
            return {}

    def entries(self) -> dict[str, Any]:
        with self._locked():
            return self._read()

    def get(self, digest: str) -> dict[str, Any] | None:
        return self.entries().get(digest)

    def put(self, digest: str, entry: dict[str, Any]) -> None:
        with self._locked():
            entries = self._read()
            entries[digest] = entry
            self._write(entries)

    def remove(self, digest: str | None = None) -> int:
        """Remove one entry (or all with None); returns how many were removed."""
        with self._locked():
            entries = self._read()
            if digest is None:
                removed, entries = len(entries), {}
            elif digest in entries:
                removed = 1
                del entries[digest]
            else:
                raise AutoquantError(
                    f"no tuning cache entry {digest!r} (see `autoquant cache list`)"
                )
            self._write(entries)
            return removed

    def _write(self, entries: dict[str, Any]) -> None:
        data = {"version": STORE_VERSION, "entries": entries}
        write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def entry_for(key: TuningKey, result: Result, previous: dict[str, Any] | None) -> dict[str, Any]:
    """What to remember of a run: every tier's outcome (old OOMs kept) and the chosen figures."""
    outcomes = {o["label"]: o for o in (previous or {}).get("outcomes", [])}
    for attempt in result.attempts:
        outcomes[attempt.label] = {
            "label": attempt.label,
            "backend": attempt.backend,
            "precision": attempt.precision,
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


def known_oom(entry: dict[str, Any]) -> set[str]:
    return {o["label"] for o in entry.get("outcomes", []) if o.get("outcome") == "oom"}


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
    }
    header = (
        f"# autoquant: the tuning of {entry['model']} on {key.get('gpu') or key.get('cpu')}\n"
        f"# (chosen {chosen['label']}, {entry['updated']}). Use with --profile FILE.\n"
    )
    return header + yaml.safe_dump(profile, sort_keys=False)
