"""Writing files and folders: readers never see half of one, a user's file is never replaced, and
what a killed writer leaves behind is removed by the next writer in that folder.

- Everything is first written under a temporary name beside its final one (``_staged``): a dot
  name ending in ``.tmp`` that names its writer (machine, boot, pid), so that the next writer in
  the folder can tell a dead writer's leftover from a live one's work in progress (``_sweep``).
- A cache's own files are then renamed over their old versions (``os.replace``). A user's files
  are *claimed* (``_claim``): the finished file is hard-linked onto its name, which the kernel
  refuses when the name exists, so of two writers racing for one name exactly one gets it.
- Modes follow the umask (0o666 and 0o777 less it, as for any file a program creates): images,
  reports, profiles and models are shared, and mkstemp's 0600 / mkdtemp's 0700 would hide them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# Of the final name, a temporary name keeps this many bytes: names stop at 255 bytes.
_NAME_BYTES = 120
_TEMP_NAME = re.compile(
    r"\..*\.aq-(?P<machine>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8})-(?P<pid>\d{1,9})-[0-9a-f]{8}\.tmp",
    re.DOTALL,
)
# What os.link answers on filesystems without hard links (FAT, exFAT, some network mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


@contextlib.contextmanager
def atomic_path(path: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a new temporary file beside ``path`` to fill (for writers that open the file
    themselves); it becomes ``path`` only if the block succeeds.

    With ``overwrite`` (a cache's own files) it replaces whatever is there. Without (a user's
    files), FileExistsError is raised when ``path`` exists, even if it appeared while the block
    ran: the existing file is never touched.
    """
    with _staged(path) as temp:
        yield temp
        _fsync(temp)
        if overwrite:
            os.replace(temp, path)
        else:
            _claim([temp], [[path]])


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", *, overwrite: bool = True) -> Iterator[IO[Any]]:
    """:func:`atomic_path`, handing out the temporary file opened in ``mode``."""
    with atomic_path(path, overwrite=overwrite) as temp, open(temp, mode) as handle:
        yield handle


def write_text_atomic(path: Path, text: str, *, overwrite: bool = True) -> None:
    with atomic_file(path, "w", overwrite=overwrite) as handle:
        handle.write(text)


def write_new(candidates: Iterable[Sequence[Path]], contents: Sequence[bytes]) -> list[Path]:
    """Write ``contents`` as new files named by the first of ``candidates`` (sets of names, one
    per content) whose names are all free, and return that set. No file is ever replaced: a set
    taken, or taken in part, even by a writer racing this one, is passed over."""
    sets = iter(candidates)
    first = next(sets)
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(_staged(name)) for name in first]
        for temp, data in zip(temps, contents, strict=True):
            temp.write_bytes(data)
            _fsync(temp)
        return _claim(temps, itertools.chain([first], sets))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    If another process created ``path`` meanwhile, its copy wins and ours is discarded.
    """
    with _staged(path, directory=True) as temp:
        yield temp
        try:
            os.rename(temp, path)
        except OSError:
            if not path.is_dir():
                raise


@contextlib.contextmanager
def _staged(path: Path, *, directory: bool = False) -> Iterator[Path]:
    """A new temporary file (or folder) named for this writer beside ``path``; it is gone once
    the block ends, whatever happens (published, its data lives on under the final name).
    Dead writers' leftovers in the folder are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent)
    temp = _temp_name(path)
    if directory:
        temp.mkdir(mode=0o777)
    else:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temp
    finally:
        if directory:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def _temp_name(path: Path) -> Path:
    machine, boot = _writer_scope()
    name = os.fsdecode(os.fsencode(path.name)[:_NAME_BYTES])
    tag = f"aq-{machine}-{boot}-{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{name}.{tag}.tmp")


@functools.cache
def _writer_scope() -> tuple[str, str]:
    """Where this process's pid means something: its machine (host name and pid namespace:
    containers on one host share its boot) and its boot, 8 hex digits each."""
    try:
        pid_namespace = str(os.stat("/proc/self/ns/pid").st_ino)
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux (macOS): only the pid can tell
        pid_namespace = boot_id = ""
    return _fingerprint(os.uname().nodename, pid_namespace), _fingerprint(boot_id)


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _sweep(folder: Path) -> None:
    """Remove the temporaries that writers killed before they finished left in ``folder``.

    One listing of the folder. Only this machine's are judged: one from an earlier boot is
    stale, and one from this boot is stale once its pid has no process (a killed writer not yet
    reaped by its parent still has one, so its leftover waits for the next sweep).
    """
    machine, boot = _writer_scope()
    with os.scandir(folder) as entries:
        leftovers = []
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if match is None or match["machine"] != machine:
                continue
            if match["boot"] != boot or not _alive(int(match["pid"])):
                leftovers.append(entry)
    for entry in leftovers:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # delivers nothing: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        pass
    return True


def _claim(temps: Sequence[Path], candidates: Iterable[Sequence[Path]]) -> list[Path]:
    """Give the finished ``temps`` the names of the first candidate set that is entirely free,
    as one set: names of a set found partly taken are given back before the next is tried.
    FileExistsError when no set is free."""
    for names in candidates:
        claimed: list[tuple[Path, bool]] = []  # (name, holds the data already)
        try:
            for temp, name in zip(temps, names, strict=True):
                claimed.append((name, _take(temp, name)))
        except BaseException as exc:
            for name, _ in claimed:
                with contextlib.suppress(FileNotFoundError):
                    name.unlink()
            if isinstance(exc, FileExistsError):
                continue
            raise
        for temp, (name, linked) in zip(temps, claimed, strict=True):
            if not linked:
                os.replace(temp, name)  # onto our own empty reservation
        return [name for name, _ in claimed]
    raise FileExistsError(errno.EEXIST, "every name asked for exists")


def _take(temp: Path, name: Path) -> bool:
    """Create ``name`` for ``temp``, failing with FileExistsError if it exists: as a hard link
    to it (True), or, where the filesystem has no hard links, as an empty file reserving the
    name for ``temp`` to be renamed onto (False; a crash in between leaves it empty, never
    half-written)."""
    try:
        os.link(temp, name)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return False
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync needs no write access, which the umask may deny
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
