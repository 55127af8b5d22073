"""Errors a user can act on.

Every error autoquant raises on purpose derives from :class:`AutoquantError`; its message is one
line that says what went wrong and what to do. The CLI prints that line and exits 2; anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class AutoquantError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(AutoquantError):
    """A profile, `--set` override or rule file is invalid."""


class ModelNotFoundError(AutoquantError):
    """The model source does not name a built-in, a local diffusers folder or a reachable hub id."""


class BackendUnavailableError(AutoquantError):
    """A quantization backend is not installed or cannot run on this hardware."""


class CacheCorruptError(AutoquantError):
    """A cached artefact failed its integrity check; callers rebuild it."""


def error_line(err: BaseException) -> str:
    """An exception as one line for a report or a log: the first line of its message, after its
    type unless it is one of ours (whose message already says what to do)."""
    lines = str(err).strip().splitlines()
    text = lines[0][:300] if lines else ""
    if isinstance(err, AutoquantError) and text:
        return text
    return f"{type(err).__name__}: {text}".strip().rstrip(":")
