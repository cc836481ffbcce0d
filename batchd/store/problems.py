"""What a failure of the database file means for the operator: busy, disk full, damaged, read-only.

SQLite reports these as a handful of exception classes whose text is terse or misleading ("disk I/O error" on a
completely full disk, "database is locked" when the application holds its write lock). :func:`explain` turns
such an exception into a :class:`~batchd.store.connection.StoreError` subclass with one line that says what
happened and what to do, so the CLI prints one line with the right exit status and the daemon shows the reason
in its STATUS= line and backs off instead of dying:

- :class:`DatabaseBusy` (a :class:`Busy`: try again later, exit 75): another connection held the write lock
  for longer than batchd's busy timeout;
- :class:`DiskFull` (temporary too, exit 75): SQLITE_FULL, ENOSPC, or an I/O error on a file system with no
  free space left (SQLite reports SQLITE_IOERR, not SQLITE_FULL, when the disk is completely full);
- :class:`Damaged` (exit 1): a corrupt, truncated or non-SQLite file;
- :class:`ReadOnly` (exit 1): the file or its folder cannot be written.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from batchd import files
from batchd.errors import one_line
from batchd.store.connection import Busy, StoreError

# Below this many free bytes an I/O error on the database's file system is taken to be "disk full": SQLite
# writes whole pages (4 KiB) and WAL frames, so a disk with less than this left cannot take one more commit.
FULL_BELOW_BYTES = 256 * 1024

# SQLite's primary result codes (sqlite3.h), for exceptions that carry ``sqlite_errorcode`` (Python 3.11+).
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


class DatabaseBusy(Busy):
    """Another connection (usually the application) held the database's write lock past the busy timeout."""


class DiskFull(StoreError):
    """No space left on the database's file system; batchd retries once space is freed."""


class Damaged(StoreError):
    """The database file is corrupt, truncated, or not an SQLite database."""


class ReadOnly(StoreError):
    """The database file (or its folder, where SQLite keeps the -wal and -shm files) cannot be written."""


def is_sqlite_error(e: BaseException) -> bool:
    """True for an exception raised by the stdlib sqlite3 or by pysqlite3 (two distinct class trees)."""
    for name in ("sqlite3", "pysqlite3.dbapi2"):
        module = sys.modules.get(name)
        if module is not None and isinstance(e, module.Error):
            return True
    return False


def explain(e: BaseException, path: str) -> StoreError | None:
    """The operator's view of ``e`` raised while using the database at ``path``, or None if it is not about
    the database file (a bug, a backend error: those are reported as they are). Never raises.

    The messages do not repeat ``path``: callers put it in front ("database error: PATH: ...").
    """
    if isinstance(e, StoreError):
        return e
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return DiskFull(_disk_full(path))
    if not is_sqlite_error(e):
        return None
    text = " ".join(str(e).split()) or type(e).__name__
    low = text.lower()
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (_BUSY, _LOCKED) or "database is locked" in low or "database table is locked" in low:
        return DatabaseBusy("database is busy: another connection (the application?) has held its write lock "
                            "for more than 10s; nothing more was written, try again")
    if primary == _FULL or "database or disk is full" in low or "no space left" in low:
        return DiskFull(_disk_full(path))
    if primary == _IOERR or "disk i/o error" in low:
        if _no_space_left(path):
            return DiskFull(_disk_full(path))
        return StoreError(f"disk I/O error ({text}): check the disk and the system log")
    if primary == _NOTADB or "file is not a database" in low:
        return Damaged("not an SQLite database (or an encrypted one): check database.path")
    if primary == _CORRUPT or "malformed" in low or "corrupt" in low:
        return Damaged(f"the database file is damaged ({text}): restore it from a backup or rebuild it with the "
                       "sqlite3 shell's .recover (`batchd check` lists what is wrong)")
    cantopen = primary == _CANTOPEN or "unable to open database" in low
    if primary == _READONLY or "readonly database" in low or "read-only" in low or (cantopen and _read_only(path)):
        return ReadOnly(f"the database is read-only ({text}): batchd needs write access to the file and to "
                        f"its folder (for the -wal and -shm files); {files.access_summary(path)}")
    if cantopen:
        if _no_space_left(path):  # the -wal/-shm (or a spool beside the database) could not be created
            return DiskFull(_disk_full(path))
        return StoreError(f"cannot open the database ({text}): check that the file and its folder exist and "
                          "are readable and writable")
    return None


def free_bytes(path: str) -> int | None:
    """Bytes available to this process on the file system holding ``path`` (its folder), or None if unknown."""
    folder = Path(path).expanduser().parent
    try:
        st = os.statvfs(folder)
    except (OSError, ValueError):
        return None
    return st.f_bavail * st.f_frsize


def _read_only(path: str) -> bool:
    """The database's file system is mounted read-only, or the file or its folder is not writable by us."""
    folder = Path(path).expanduser().parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
    except (OSError, ValueError):
        return False
    return not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK))


def _no_space_left(path: str) -> bool:
    free = free_bytes(path)
    return free is not None and free < FULL_BELOW_BYTES


def _disk_full(path: str) -> str:
    free = free_bytes(path)
    left = f" ({free // 1024} KiB free)" if free is not None else ""
    return (f"disk full: no space left on the database's file system{left}; free some space, then try again "
            "(the daemon retries by itself)")


def describe_problem(e: BaseException, path: str) -> str:
    """One line for ``e`` raised while using the database at ``path``: the file's state in plain words when
    :func:`explain` knows it ("disk full: ...", "database is busy: ..."), else :func:`batchd.errors.one_line`."""
    problem = explain(e, path)
    return one_line(problem if problem is not None else e)


__all__ = [
    "FULL_BELOW_BYTES",
    "Damaged",
    "DatabaseBusy",
    "DiskFull",
    "ReadOnly",
    "describe_problem",
    "explain",
    "free_bytes",
    "is_sqlite_error",
]
