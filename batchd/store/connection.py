"""The connection to the shared database file: which SQLite library, pragmas, transactions, the worker lock.

Locking: the connection runs in autocommit mode; every write goes through :meth:`StoreBase.transaction`, which
opens ``BEGIN IMMEDIATE`` (take the write lock up front, so a transaction never fails half way on a lock upgrade)
and commits or rolls back. Write transactions are kept to at most ~10,000 small rows (about 0.1 s) so the
application sharing the file never waits more than a fraction of a second. No transaction is ever open across a
network call. The worker lock (an flock beside the database) keeps a second batchd process from flushing or
syncing the same database at the same time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchd import files
from batchd.config import Config
from batchd.errors import BatchdError

if TYPE_CHECKING:  # pragma: no cover
    from batchd.store import Store


class StoreError(BatchdError):
    """The database cannot be used as configured. ``str()`` is one line saying what to do."""


class Busy(StoreError):
    """Another batchd process is flushing or syncing this database right now; try again later."""


class Missing(StoreError):
    """The database file does not exist, and this command does not create it (only enqueue, run and demo do)."""


class SchemaMismatch(StoreError):
    """The configuration does not fit the database (EX_CONFIG, 78): restarting cannot help, editing can.

    ``key`` is the config key at fault; ``fields`` carries the numbers for a structured log event, e.g.
    ``{"configured_dimensions": 384, "database_dimensions": 768, "fix": "batchd reset-vectors --yes"}``.
    """

    def __init__(self, message: str, key: str, **fields: Any):
        super().__init__(message)
        self.key = key
        self.fields = fields


def _sqlite_module() -> Any:
    """The stdlib sqlite3 if it can load extensions, else pysqlite3, else a StoreError that says what to install."""
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        from pysqlite3 import dbapi2  # type: ignore[import-not-found]
    except ImportError:
        raise StoreError(
            "this Python's sqlite3 cannot load extensions (needed for sqlite-vec): "
            "install pysqlite3-binary (pip install pysqlite3-binary, Linux x86_64) or pysqlite3, "
            "or use a Python built with --enable-loadable-sqlite-extensions"
        ) from None
    return dbapi2


def iso(ts: float) -> str:
    """Epoch seconds -> '2026-11-30T09:00:00Z' (sortable as text)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def quote_ident(name: str) -> str:
    """Quote an identifier (config validated it as a plain identifier already)."""
    return '"' + name.replace('"', '""') + '"'


def _connect(sqlite: Any, path: str, *, create: bool, readonly: bool = False) -> Any:
    """Open the file (autocommit). Never creates folders; creates the file only when ``create``."""
    if path == ":memory:":
        return sqlite.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    file = Path(path)
    if not file.parent.is_dir():
        raise StoreError(f"database folder {file.parent} does not exist (batchd creates the database file, "
                         "never the folders above it: check database.path, or create the folder)")
    if not file.exists() and not create:
        raise Missing(f"database {path} does not exist (check database.path; `batchd enqueue` or "
                      "`batchd run` creates it)")
    mode = "ro" if readonly else ("rwc" if create else "rw")
    try:
        # A file: URI so that mode=rw really refuses to create the file (no race with a plain connect).
        return sqlite.connect(f"{file.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None,
                              check_same_thread=False, timeout=10.0)
    except sqlite.Error as e:
        from batchd.store.problems import explain

        raise explain(e, path) or StoreError(f"cannot open database {path}: {e}") from None


def _load_vec(conn: Any) -> None:
    import sqlite_vec

    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise StoreError(f"cannot load the sqlite-vec extension: {e}") from None



def lock_path(db_path: str) -> str:
    """The worker lock's file for a database: ``batchd-<inode>.lock`` in the folder the file really lives in.

    Keyed on the file, not on the path string: every name that reaches the database — a symlink, a relative path,
    a hard link in the same folder — gives the same lock file, so at most one batchd process works on a database
    however it is named (issue 9, item 2). A hard link in another folder is not a supported way to share a
    database at all: SQLite names the WAL and shared-memory files after the path, so two names corrupt it.
    """
    real = os.path.realpath(db_path)
    return os.path.join(os.path.dirname(real), f"batchd-{os.stat(real).st_ino}.lock")


def _parse_claimed(text: str) -> tuple[str, int] | None:
    """(instance id, highest batch id claimed) from a lock file's second line, or None."""
    lines = text.splitlines()
    parts = lines[1].split() if len(lines) > 1 else []
    if len(parts) == 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


# SQLite errors about the database as a whole: retried later by the step, never blamed on one chunk.
_WHOLE_DATABASE = ("database is locked", "database table is locked", "disk i/o error", "database or disk is full",
                   "readonly database", "unable to open", "no such table", "no such module", "no such column",
                   "malformed", "not a database", "interrupted", "savepoint", "no transaction")


def about_one_row(e: Exception) -> bool:
    """True for a refusal of one row's write (a constraint, an app trigger's RAISE, a value vec0 rejects)."""
    text = str(e).lower()
    return not any(marker in text for marker in _WHOLE_DATABASE)


def claimed_before(db_path: str) -> tuple[str, int] | None:
    """What the lock file remembers of this database file's claims: (instance id, highest batch id), or None."""
    try:
        with open(lock_path(db_path)) as f:
            return _parse_claimed(f.read())
    except OSError:
        return None


class StoreBase:
    """One SQLite connection to the shared database file; the concerns built on it are mixins (batchd.store)."""

    def __init__(self, conn: Any, config: Config, sqlite: Any):
        self._conn = conn
        self._sqlite = sqlite
        self.config = config
        db = config.database
        self.q_table = quote_ident(db.chunks_table)
        self.q_id = quote_ident(db.id_column)
        self.q_text = quote_ident(db.text_column)
        self.dimensions = config.embedding.dimensions
        self.instance_id = ""
        self._lock_file: Any = None
        self._lock_depth = 0
        # Check at every worker step that chunks_vec still fits the config: a `batchd reset-vectors` or
        # `uninstall` run meanwhile with another config stops this worker (SchemaMismatch) instead of failing
        # every step. Off for the stores of those two commands themselves.
        self.verify_on_lock = True
        self._wrote = False  # a write transaction ran: close() may then run PRAGMA optimize

    def _verify_schema(self) -> None:
        """Raise SchemaMismatch when the database no longer fits the config (schema.py)."""

    @classmethod
    def open(cls, config: Config, *, create: bool = True, migrate: bool = True,
             check_dimensions: bool = True) -> Store:
        """Connect (WAL, busy_timeout, foreign keys, sqlite-vec), check the app's table, create or migrate the schema.

        ``create=False`` refuses a missing database file (:class:`Missing`); folders are never created.
        ``migrate=False`` leaves the schema as it is (``batchd uninstall``); ``check_dimensions=False`` accepts
        a chunks_vec of another size (``batchd reset-vectors``). Raises StoreError with a one-line reason;
        :class:`SchemaMismatch` (before anything is changed) when the config does not fit the database.
        The subclasses of batchd.store.problems for a busy, full, damaged or read-only database.
        """
        from batchd.store.problems import explain

        sqlite = _sqlite_module()
        path = config.database.path
        existed = path == ":memory:" or Path(path).expanduser().exists()
        conn = _connect(sqlite, path, create=create)
        try:
            _load_vec(conn)
            conn.execute("PRAGMA busy_timeout = 10000")
            store = cls(conn, config, sqlite)
            store.verify_on_lock = migrate and check_dimensions
            if migrate:
                store._check_config_fits(dimensions=check_dimensions)  # type: ignore[attr-defined]
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if path != ":memory:" and str(mode).lower() != "wal":
                    raise StoreError(f"cannot switch {path} to WAL mode (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            # 32 MiB page cache (default 2 MiB): a 2,000-vector slice or a 10,000-row enqueue slice dirties more
            # than 2 MiB, and spilling mid-transaction slowed both down (bench/, README "Benchmarks").
            conn.execute("PRAGMA cache_size = -32768")
            conn.execute("PRAGMA foreign_keys = ON")
            if migrate:
                store._migrate()  # type: ignore[attr-defined]
            else:
                store.instance_id = store._read_instance_id() or ""  # type: ignore[attr-defined]
        except sqlite.DatabaseError as e:
            conn.close()
            raise explain(e, path) or StoreError(f"cannot use database {path}: {e}") from None
        except BaseException:
            conn.close()
            raise
        if not existed:
            # SQLite creates files 0644 minus the umask: make the new database group-writable (the application
            # shares it through the group), and when made by root (`sudo batchd ...`) give it the folder's owner
            # and group, or the service could never write it.
            for p in (path, f"{path}-wal", f"{path}-shm"):
                files.make_shared(p, Path(path).expanduser().resolve().parent)
        return store

    def probe_write(self) -> None:
        """Prove this connection can write the database: one real committed write (a WAL frame).

        Raises ReadOnly naming the files and their owners when it cannot (e.g. ``-wal``/``-shm`` created by the
        application with its own group): the daemon then fails its start instead of reporting READY.
        """
        from batchd.store.problems import explain

        try:
            with self.transaction() as c:
                c.execute("UPDATE batchd_meta SET value = value WHERE key = 'schema_version'")
        except self._sqlite.Error as e:
            path = self.config.database.path
            raise explain(e, path) or StoreError(f"cannot write database {path}: {e}") from None

    @contextlib.contextmanager
    def worker_lock(self) -> Iterator[None]:
        """Hold the database's worker lock: one batchd process at a time flushes, syncs or recovers.

        Two workers on one file (the daemon and a hand-run `batchd flush`) could otherwise both find a
        batch left without a job and both submit it: paying twice. The lock is an flock on the file
        :func:`lock_path` names — keyed on the database file itself, so two configs reaching it through a
        symlink or a hard link share it (released by the kernel if the process dies), never waited for:
        raises :class:`Busy` naming the holder's pid. Re-entrant within this Store.
        """
        path = self.config.database.path
        if path == ":memory:":
            yield
            return
        if self._lock_depth == 0:
            import fcntl

            lock = lock_path(path)
            created = not os.path.exists(lock)
            try:
                f = open(lock, "a+")  # kept open while the lock is held
            except OSError as e:
                raise StoreError(f"cannot open the worker lock {lock} ({files.owner_text(lock)}): {e.strerror}; "
                                 f"it must be writable by this user ({files.owner_text_ids()}): "
                                 f"chown --reference={path} {lock} && chmod 0660 {lock}") from None
            if created:
                files.adopt(lock, path)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = (f.read().split() or ["?"])[0]
                f.close()
                raise Busy(f"another batchd process (pid {holder}) is flushing or syncing {path}; "
                           "try again when it is done") from None
            self._lock_file = f
            try:
                f.seek(0)
                self._write_lock_file(_parse_claimed(f.read()))
                if self.verify_on_lock:
                    self._verify_schema()
            except BaseException:
                # A full disk, say, or a database that no longer fits the config: let go of the lock, or this
                # process would hold it against itself for good (every later step "busy" with its own descriptor).
                self._lock_file = None
                f.close()
                raise
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_file is not None:
                self._lock_file.close()  # closing the descriptor releases the flock
                self._lock_file = None

    def _write_lock_file(self, claimed: tuple[str, int] | None) -> None:
        """The lock file says who holds it and the highest batch id claimed for which instance: ``pid`` then
        ``instance batch_id``. The second line outlives the database's content, so a file restored in place
        from an older backup is recognised (schema.py, ``_check_copy``)."""
        f = self._lock_file
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n" + (f"{claimed[0]} {claimed[1]}\n" if claimed else ""))
        f.flush()

    def note_claimed(self, batch_id: int) -> None:
        """Record a committed claim in the lock file (under the worker lock only; a no-op without it)."""
        if self._lock_file is None:
            return
        self._lock_file.seek(0)
        seen = _parse_claimed(self._lock_file.read())
        if seen is None or seen[0] != self.instance_id or seen[1] < batch_id:
            self._write_lock_file((self.instance_id, batch_id))

    def close(self) -> None:
        """Close the connection. Never waits for the write lock: a reader (stats, jobs, search) must not be held
        up by the application's long transaction, so PRAGMA optimize (which may write statistics) runs only
        after this connection wrote, and gives up at once if the lock is taken."""
        if self._wrote:
            with contextlib.suppress(Exception):
                self._conn.execute("PRAGMA busy_timeout = 0")
                self._conn.execute("PRAGMA optimize")
        self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (also when COMMIT itself fails).

        The exception that caused the rollback is the one raised: on a full disk SQLite may already have rolled
        back by itself, and "no transaction is active" would hide the reason. The connection is left usable
        (no transaction open) either way, so a daemon can try again once the problem is gone.
        """
        self._wrote = True
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                with contextlib.suppress(Exception):
                    self._conn.execute("ROLLBACK")
            raise

    @property
    def sqlite_module(self) -> Any:
        """The DB-API module in use (stdlib sqlite3 or pysqlite3).

        An application that shares this process with batchd must open its own connections with this same
        module: two copies of the SQLite library in one process do not share POSIX lock bookkeeping, and
        closing a connection of one silently drops the other's locks on the same file.
        """
        return self._sqlite

    @property
    def sqlite_version(self) -> str:
        return str(self._sqlite.sqlite_version)

    def vec_version(self) -> str:
        return str(self._conn.execute("SELECT vec_version()").fetchone()[0])

