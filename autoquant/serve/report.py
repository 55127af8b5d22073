"""The tuning report as `GET /report` serves it: no location of the model or of the caches in it.

The server knows which of the report's fields hold those paths and what they are, so it replaces
them by value instead of guessing from text what a path looks like (a folder named with a space
or a comma, or a relative one, does not look like a path to a pattern)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.core.paths import cache_dir

if TYPE_CHECKING:
    from autoquant.execute.ladder import Result

REDACTED = "<path>"

# An absolute path in free text the server was not told about (a library's file in an error
# message); the known locations are replaced by value before this runs.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.@+-]+/)*[\w.@+-]+")


def json_ready(report: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON values (it holds a few others, e.g. paths), as `run --json`
    prints it."""
    return dict(json.loads(json.dumps(report, default=str)))


def redact_paths(value: Any) -> Any:
    """``value`` with absolute paths in its strings replaced (an error message's)."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(REDACTED, value)
    if isinstance(value, dict):
        return {key: redact_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_paths(item) for item in value]
    return value


def spellings(paths: Iterable[str | Path]) -> list[str]:
    """Every way each of ``paths`` may be written in a message (as given, absolute, resolved,
    relative to the working directory), longest first so a path goes before its parent."""
    found: set[str] = set()
    for given in paths:
        path = Path(given).expanduser()
        absolute, resolved = path.absolute(), path.resolve()
        forms = {str(given), str(path), str(absolute), str(resolved)}
        forms |= {os.path.relpath(absolute), os.path.relpath(resolved)}
        found.update(f.rstrip(os.sep) for f in forms)
    return sorted((f for f in found if f not in ("", ".", "..")), key=len, reverse=True)


def public_report(
    report: dict[str, Any], private: Iterable[str | Path], *, local_model: bool
) -> dict[str, Any]:
    """``report`` (JSON values, as `run --json` prints it) without the ``private`` locations:
    the fields that hold one (the model when it is a folder, the tuning cache's file) are
    replaced whole, and any spelling of one inside another string becomes ``<path>``."""
    patterns = [
        # Not inside a longer name: a folder called "m" leaves "memory" alone.
        re.compile(rf"(?<![\w-]){re.escape(form)}(?![\w-])")
        for form in spellings(private)
    ]

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for pattern in patterns:
                value = pattern.sub(REDACTED, value)
            return value
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [scrub(item) for item in value]
        return value

    public: dict[str, Any] = scrub(report)
    if local_model:
        public["model"] = REDACTED
        public["plan"]["model"] = REDACTED
    if public.get("cache"):
        public["cache"]["path"] = REDACTED
    # Messages may quote any file, not only the ones named above.
    public["tried"] = [
        {**attempt, "error": redact_paths(attempt["error"])} for attempt in public["tried"]
    ]
    for field in ("warnings", "adjustments"):
        public[field] = redact_paths(public[field])
    return public


def private_locations(result: Result, model_spec: str, *, local_model: bool) -> list[str | Path]:
    """Where this server keeps what ``result`` was built from: the model's folder (and the spec
    that named it, when it is one), autoquant's cache with its tuning store, the hub's cache."""
    from huggingface_hub import constants

    locations: list[str | Path] = [result.folder, cache_dir(), constants.HF_HUB_CACHE]
    if local_model:
        locations.append(model_spec)
    if result.cache:
        locations.append(result.cache["path"])
    return locations
