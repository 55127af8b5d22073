"""The tuning store: one JSON map (``<cache>/tuning.json``) of digest → entry, nothing more.

Writers take an exclusive file lock and replace the file atomically, so two processes tuning at
once never corrupt it or lose each other's entries. A store that cannot be read is set aside
(never deleted) with a warning, and reads as empty. What a key and an entry hold is the
executor's business (autoquant/execute/tuning_entry.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from autoquant.core.errors import AutoquantError
from autoquant.core.fsutil import write_text_atomic
from autoquant.core.paths import cache_dir

STORE_VERSION = 1
Warn = Callable[[str], None]


def store_path() -> Path:
    return cache_dir() / "tuning.json"


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
