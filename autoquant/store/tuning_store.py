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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
        except OSError as err:
            raise AutoquantError(
                f"cannot use the tuning cache in {self.path.parent} ({err.strerror or err}): "
                "make it writable or set AUTOQUANT_CACHE_DIR to a writable folder"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        """All entries; an unreadable store (not JSON, not UTF-8, not a file) is moved aside with
        a warning and reads as empty."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != STORE_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError("not an autoquant tuning store")
            return dict(data["entries"])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as err:  # UnicodeDecodeError is a ValueError
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError as moving:
                raise AutoquantError(
                    f"tuning cache {self.path} is unreadable ({err}) and cannot be moved aside "
                    f"({moving.strerror or moving}): remove it or set AUTOQUANT_CACHE_DIR"
                ) from None
            self._warn(
                f"warning: tuning cache {self.path} is unreadable ({_reason(err)}); moved it to "
                f"{aside.name} and re-tuning"
            )
            return {}

    def entries(self) -> dict[str, Any]:
        with self._locked():
            return self._read()

    def get(self, digest: str) -> dict[str, Any] | None:
        return self.entries().get(digest)

    def update(
        self, digest: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]
    ) -> dict[str, Any]:
        """Replace one entry by ``change(current entry or None)``, reading and writing under one
        lock: two processes updating one key both keep what they added."""
        with self._locked():
            entries = self._read()
            entries[digest] = change(entries.get(digest))
            self._write(entries)
            return dict(entries[digest])

    def put(self, digest: str, entry: dict[str, Any]) -> None:
        self.update(digest, lambda _current: entry)

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
        try:
            write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError as err:
            raise AutoquantError(
                f"cannot write the tuning cache {self.path} ({err.strerror or err}): make it "
                "writable or set AUTOQUANT_CACHE_DIR to a writable folder"
            ) from None


def _reason(err: BaseException) -> str:
    if isinstance(err, IsADirectoryError):
        return "it is a folder"
    if isinstance(err, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return str(err)
