"""Files batchd creates beside the database, and who may use them.

The database is shared by two users: the service (user ``batchd``) and the application (a member of group
``batchd``). Whatever batchd creates — the database itself, the worker lock, local job files — must stay usable
by both, and by nobody else:

- :data:`UMASK` (0o007) is set for batchd's own process by the command line: new files are 0660, new folders
  0770 (SQLite gives ``-wal``/``-shm`` the database file's own mode).
- :func:`adopt`: a file or folder created by root (``sudo batchd sync``) is given the database's owner and group,
  so the service is not locked out by it afterwards.
- :func:`access_problems` is what ``batchd check`` reports: the database, its ``-wal``/``-shm`` and its folder
  must be writable by the service's group; the folder should be setgid so files the application creates get
  that group too.
- :func:`interpreter_problem`: a virtual environment made from a Python under /root or /home cannot start under
  the unit's ``ProtectHome=yes``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

UMASK = 0o007
SERVICE_USER = "batchd"
SERVICE_GROUP = "batchd"


def private_umask() -> None:
    """Files this process creates are never readable by others (issue: world-readable chunk texts)."""
    os.umask(UMASK)


def adopt(path: str | os.PathLike[str], like: str | os.PathLike[str]) -> None:
    """When running as root, give ``path`` the owner and group of ``like`` (the database, else its folder).

    A no-op for any other user (only root can chown, and files made by the user itself are already usable by
    it). Never raises: a file that keeps root's ownership is reported by ``batchd check``.
    """
    if os.geteuid() != 0:
        return
    ref = Path(like)
    with contextlib.suppress(OSError):
        st = ref.stat() if ref.exists() else ref.parent.stat()
        os.chown(path, st.st_uid, st.st_gid)


def make_shared(path: str | os.PathLike[str], like: str | os.PathLike[str]) -> None:
    """A file batchd just created: read-write for owner and group as the umask allows (SQLite creates its files
    0644 minus the umask), and :func:`adopt`-ed. Never raises (a missing file is skipped)."""
    current = os.umask(UMASK)
    os.umask(current)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~current)
        adopt(path, like)


def owner_text(path: str | os.PathLike[str]) -> str:
    """``user:group 0644`` for a message, or ``missing``."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{_user(st.st_uid)}:{_group(st.st_gid)} {stat.S_IMODE(st.st_mode):04o}"


def owner_text_ids() -> str:
    """``user:group`` of this process, for a message."""
    return f"{_user(os.geteuid())}:{_group(os.getegid())}"


def access_summary(db_path: str) -> str:
    """Who this process is and whose each database file is, for a "read-only database" message."""
    owners = ", ".join(f"{p} {owner_text(p)}" for p in (db_path, f"{db_path}-wal", f"{db_path}-shm")
                       if os.path.exists(p))
    return (f"this process is {owner_text_ids()}, the files are {owners}; each must be readable and writable by "
            f"group {SERVICE_GROUP} (see `batchd check`)")


@dataclass(frozen=True)
class Finding:
    """One line of ``batchd check`` about a file: ok, warn (works, but fragile) or fail (the service is locked out)."""

    level: str  # "ok" | "warn" | "fail"
    name: str
    detail: str


def service_ids() -> tuple[int | None, int]:
    """(uid of user batchd, gid of group batchd) — on a host without them, this process's own user and group
    (batchd run by hand, or as some other service user)."""
    try:
        uid: int | None = pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        uid = os.geteuid()
    try:
        gid = grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        gid = os.getegid()
    return uid, gid


def access_problems(db_path: str) -> list[Finding]:
    """Can the service (user batchd, or any member of group batchd) write the database, its -wal/-shm and its
    folder? Read-only: looks at owners and modes, creates nothing."""
    if db_path == ":memory:":
        return []
    uid, gid = service_ids()
    gname = _group(gid)
    db = Path(db_path).expanduser()
    folder = db.resolve().parent
    out: list[Finding] = []

    def writable(st: os.stat_result, need: int) -> bool:
        if uid is not None and st.st_uid == uid and st.st_mode & (need << 6) == need << 6:
            return True
        return st.st_gid == gid and st.st_mode & (need << 3) == need << 3

    try:
        fst = folder.stat()
    except FileNotFoundError:
        return []  # opening the database reports a missing folder
    except OSError as e:
        return [Finding("fail", "database folder", f"{folder}: {e.strerror}")]
    if not writable(fst, 0o3):
        out.append(Finding("fail", "database folder",
                           f"{folder} ({owner_text(folder)}) is not writable by group {gname}: SQLite creates "
                           f"-wal/-shm there (chgrp {gname} {folder} && chmod 2770 {folder})"))
    elif not fst.st_mode & stat.S_ISGID and fst.st_gid == gid:
        out.append(Finding("warn", "database folder",
                           f"{folder} is not setgid: files the application creates there get its own group and "
                           f"lock the service out (chmod g+s {folder})"))
    else:
        out.append(Finding("ok", "database folder", f"{folder} ({owner_text(folder)})"))
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        except OSError as e:
            out.append(Finding("fail", f"file {p.name}", f"{p}: {e.strerror}"))
            continue
        if not writable(st, 0o6):
            out.append(Finding("fail", f"file {p.name}",
                               f"{p} ({owner_text(p)}) is not readable and writable by group {gname}: the service "
                               f"gets 'attempt to write a readonly database' (chgrp {gname} {p} && chmod 0660 {p})"))
        elif st.st_mode & 0o007:
            out.append(Finding("warn", f"file {p.name}", f"{p} ({owner_text(p)}) is readable by other users "
                                                         f"(chmod o-rwx {p})"))
        else:
            out.append(Finding("ok", f"file {p.name}", owner_text(p)))
    return out


def interpreter_problem() -> str | None:
    """Why the unit could not start this Python (ProtectHome=yes hides /root and /home), or None."""
    for where in {Path(sys.executable).resolve(), Path(sys.base_prefix).resolve()}:
        if any(where.is_relative_to(home) for home in ("/root", "/home")):
            return (f"the Python interpreter lives in {where}, which the unit hides (ProtectHome=yes): the "
                    "service would fail with 203/EXEC; make the virtual environment from a system Python "
                    "(/usr/bin/python3)")
    return None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


__all__ = ["UMASK", "Finding", "access_problems", "access_summary", "adopt", "interpreter_problem", "make_shared", "owner_text", "owner_text_ids", "private_umask",
           "service_ids"]
