"""Progress lines for the user: on stderr (stdout stays for results and --json), or nowhere."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _nowhere(_message: str) -> None:
    pass


def progress_log(enabled: bool = True) -> Log:
    """A log function: one line per message on stderr when enabled, silent otherwise."""
    return _to_stderr if enabled else _nowhere
