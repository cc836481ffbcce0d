"""The SQLite file: connection, schema, migrations, and every SQL statement batchd runs.

Nothing else in batchd imports sqlite3 or sqlite_vec or holds SQL text.

Locking: the connection runs in autocommit mode; every write goes through
:meth:`Store.transaction`, which opens ``BEGIN IMMEDIATE`` (take the write lock
up front, so a transaction never fails half way on a lock upgrade) and commits
or rolls back. Write transactions are kept to at most ~10,000 small rows (about 0.1 s) so the
application sharing the file never waits more than a fraction of a second.
No transaction is ever open across a network call.

Chunk states (columns batchd adds to the application's table):
  pending  embedding_status='PENDING' AND batch_job_id IS NULL
  running  embedding_status='PENDING' AND batch_job_id IS NOT NULL (claimed by a batch)
  ready    embedding_status='READY'   (a vector in chunks_vec)
  failed   embedding_status='FAILED'  (error_message says why)
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.backends import Item, ResultLine
from batchd.config import Config

SCHEMA_VERSION = 3
HASH_SLICE = 5_000
IN_SLICE = 500  # keys per "IN (?, ...)" query: well under SQLite's oldest variable limit (999)
ENQUEUE_SLICE = 10_000  # rows per enqueue transaction: <= ~100 ms of plain inserts (bench/: 5,000 was ~15% slower)


class StoreError(Exception):
    """The database cannot be used as configured. ``str()`` is one line saying what to do."""


class Busy(StoreError):
    """Another batchd process is flushing or syncing this database right now; try again later."""


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


@dataclass(frozen=True)
class BatchRow:
    id: int
    google_job_id: str | None
    status: str
    total_chunks: int
    completed_chunks: int
    failed_chunks: int
    error_message: str | None
    model: str | None
    input_uri: str | None
    output_uri: str | None
    remote_state: str | None
    token_count: int | None
    created_at: str
    updated_at: str
    finished_at: str | None


@dataclass(frozen=True)
class EnqueueCounts:
    inserted: int = 0
    requeued: int = 0
    unchanged: int = 0


@dataclass(frozen=True)
class ApplyCounts:
    applied: int = 0  # chunks that became READY
    errored: int = 0  # chunks sent back for retry (or FAILED) because their line failed
    failed: int = 0  # of those, chunks that reached max_attempts
    tokens: int = 0


class Store:
    """One SQLite connection to the shared database file, with batchd's schema in place."""

    def __init__(self, conn: Any, config: Config, sqlite: Any):
        self._conn = conn
        self._sqlite = sqlite
        self.config = config
        db = config.database
        self.t = _q(db.chunks_table)
        self.id = _q(db.id_column)
        self.text = _q(db.text_column)
        self.dimensions = config.embedding.dimensions
        self.instance_id = ""
        self._lock_file: Any = None
        self._lock_depth = 0

    # ------------------------------------------------------------------ connection

    @classmethod
    def open(cls, config: Config, *, create: bool = True) -> Store:
        """Connect (WAL, busy_timeout, foreign keys, sqlite-vec) and create or migrate the schema.

        Raises StoreError with a one-line reason (no extension support, unreadable file, a chunks_vec
        of another dimension, an app table lacking the configured columns).
        """
        sqlite = _sqlite_module()
        path = config.database.path
        if path != ":memory:":
            parent = Path(path).expanduser().resolve().parent
            if not parent.is_dir():
                if not create:
                    raise StoreError(f"database folder {parent} does not exist")
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"cannot create database folder {parent}: {e.strerror}") from None
        try:
            conn = sqlite.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite.Error as e:
            raise StoreError(f"cannot open database {path}: {e}") from None
        try:
            _load_vec(conn)
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if path != ":memory:" and str(mode).lower() != "wal":
                raise StoreError(f"cannot switch {path} to WAL mode (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            # 32 MiB page cache (default 2 MiB): a 2,000-vector slice or a 10,000-row enqueue slice dirties more
            # than 2 MiB, and spilling mid-transaction made both ~1.5x slower (bench/, README "Benchmarks").
            conn.execute("PRAGMA cache_size = -32768")
            conn.execute("PRAGMA foreign_keys = ON")
            store = cls(conn, config, sqlite)
            store._migrate()
        except sqlite.DatabaseError as e:
            conn.close()
            raise StoreError(f"cannot use database {path}: {e}") from None
        except BaseException:
            conn.close()
            raise
        return store

    @contextlib.contextmanager
    def worker_lock(self) -> Iterator[None]:
        """Hold the database's worker lock: one batchd process at a time flushes, syncs or recovers.

        Two workers on one file (the daemon and a hand-run `batchd flush`) could otherwise both find a
        batch left without a job and both submit it: paying twice. The lock is an flock on
        ``<database>-batchd.lock`` (released by the kernel if the process dies), never waited for:
        raises :class:`Busy` naming the holder's pid. Re-entrant within this Store.
        """
        path = self.config.database.path
        if path == ":memory:":
            yield
            return
        if self._lock_depth == 0:
            import fcntl

            f = open(f"{path}-batchd.lock", "a+")  # kept open while the lock is held
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise Busy(f"another batchd process (pid {holder}) is flushing or syncing {path}; "
                           "try again when it is done") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            self._lock_file = f
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_file is not None:
                self._lock_file.close()  # closing the descriptor releases the flock
                self._lock_file = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.execute("PRAGMA optimize")
        self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

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

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("CREATE TABLE IF NOT EXISTS batchd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = conn.execute("SELECT value FROM batchd_meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database schema version {version} is newer than this batchd understands ({SCHEMA_VERSION}); "
                "upgrade batchd"
            )
        for number, step in enumerate(STEPS, start=1):
            if number <= version:
                continue
            with self.transaction():
                step(self)
                conn.execute(
                    "INSERT INTO batchd_meta(key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(number),),
                )
        self._check_app_table()
        self._check_vec_dimensions()
        self.instance_id = self._ensure_instance_id()

    def _ensure_instance_id(self) -> str:
        row = self._conn.execute("SELECT value FROM batchd_meta WHERE key = 'instance_id'").fetchone()
        if row:
            return str(row[0])
        with self.transaction() as c:
            # Lowercase hex: valid as a GCS path segment and as a Vertex label value.
            c.execute("INSERT OR IGNORE INTO batchd_meta(key, value) VALUES ('instance_id', ?)",
                      (secrets.token_hex(6),))
            return str(c.execute("SELECT value FROM batchd_meta WHERE key = 'instance_id'").fetchone()[0])

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT value FROM batchd_meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    # Schema introspection of the application's table goes through sqlite-utils (read-only calls: they
    # never open or commit a transaction of their own, so they are safe inside a migration step).

    def _schema(self) -> Any:
        import sqlite_utils

        return sqlite_utils.Database(self._conn, recursive_triggers=False, execute_plugins=False)

    def table_columns(self, table: str) -> list[str]:
        return list(self._schema()[table].columns_dict)

    def table_exists(self, table: str) -> bool:
        return bool(self._schema()[table].exists())

    def execute_ddl(self, sql: str) -> None:
        """Run one DDL statement (used by migrations, inside their transaction)."""
        self._conn.execute(sql)

    def _check_app_table(self) -> None:
        db = self.config.database
        cols = {c.lower() for c in self.table_columns(db.chunks_table)}
        for key, col in (("database.id_column", db.id_column), ("database.text_column", db.text_column)):
            if col.lower() not in cols:
                raise StoreError(f"table {db.chunks_table} has no column {col!r} (set {key} in the config)")

    def vec_dimensions(self) -> int | None:
        row = self._conn.execute("SELECT sql FROM sqlite_master WHERE name = 'chunks_vec'").fetchone()
        if not row or not row[0]:
            return None
        m = re.search(r"float\[(\d+)\]", row[0])
        return int(m.group(1)) if m else None

    def _check_vec_dimensions(self) -> None:
        have = self.vec_dimensions()
        if have is not None and have != self.dimensions:
            raise StoreError(
                f"chunks_vec holds {have}-dimension vectors but embedding.dimensions is {self.dimensions}; "
                "set it back, or drop chunks_vec and re-embed (batchd never drops vectors itself)"
            )

    # ------------------------------------------------------------------ enqueue

    def enqueue(self, rows: Iterable[tuple[int | None, str]], hasher: Callable[[str], str], now: float,
                on_slice: Callable[[int], None] | None = None) -> EnqueueCounts:
        """Insert texts (id None) or upsert by id, in transactions of ENQUEUE_SLICE rows.

        An existing row whose text is unchanged is left alone; one whose text changed is re-queued by the
        update trigger (out of any batch, attempts reset, old vector scheduled for removal).
        """
        inserted = requeued = unchanged = 0
        t, i, x = self.t, self.id, self.text
        q_at = iso(now)
        insert = (f"INSERT INTO {t}({x}, content_hash, queued_at) VALUES (?, ?, ?)")
        upsert = (
            f"INSERT INTO {t}({i}, {x}, content_hash, queued_at) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT({i}) DO UPDATE SET {x} = excluded.{x} WHERE {x} IS NOT excluded.{x}"
        )
        exists = f"SELECT {x} FROM {t} WHERE {i} = ?"
        buf: list[tuple[int | None, str]] = []

        def write(batch: list[tuple[int | None, str]]) -> None:
            nonlocal inserted, requeued, unchanged
            hashes = [hasher(text) for _, text in batch]  # before BEGIN: the write lock is held for SQL only
            with self.transaction() as c:
                run: list[tuple[str, str, str]] = []  # consecutive rows without id: one executemany, in order
                for (cid, text), digest in zip(batch, hashes):
                    if cid is None:
                        run.append((text, digest, q_at))
                        continue
                    if run:
                        c.executemany(insert, run)
                        inserted += len(run)
                        run = []
                    old = c.execute(exists, (cid,)).fetchone()
                    if old is None:
                        inserted += 1
                    elif old[0] == text:
                        unchanged += 1
                        continue
                    else:
                        requeued += 1
                    c.execute(upsert, (cid, text, digest, q_at))
                if run:
                    c.executemany(insert, run)
                    inserted += len(run)
            if on_slice:
                on_slice(len(batch))

        for row in rows:
            buf.append(row)
            if len(buf) >= ENQUEUE_SLICE:
                write(buf)
                buf = []
        if buf:
            write(buf)
        return EnqueueCounts(inserted, requeued, unchanged)

    # ------------------------------------------------------------------ flush

    def purge_tombstones(self) -> int:
        """Remove vectors of chunks the app deleted or rewrote (the triggers record them; the app's own
        connection may not have sqlite-vec loaded, so triggers never touch chunks_vec themselves)."""
        total = 0
        while True:
            with self.transaction() as c:
                ids = [r[0] for r in c.execute("SELECT chunk_id FROM batchd_tombstones LIMIT 2000")]
                if not ids:
                    return total
                c.executemany("DELETE FROM chunks_vec WHERE chunk_id = ?", [(x,) for x in ids])
                c.executemany("DELETE FROM batchd_tombstones WHERE chunk_id = ?", [(x,) for x in ids])
                total += len(ids)

    def prepare_pending(self, hasher: Callable[[str], str], now: float) -> tuple[int, int]:
        """Hash new pending chunks (rows the app inserted directly) and fail those with no text.

        Returns (hashed, failed_empty). Each slice is its own short transaction.
        """
        t, i, x = self.t, self.id, self.text
        failed = 0
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE {t} SET embedding_status = 'FAILED', batch_job_id = NULL, "
                "error_message = CASE WHEN typeof(" + x + ") IN ('text', 'null') "
                "THEN 'empty text: nothing to embed' ELSE 'text is not a string (' || typeof(" + x + ") || ')' END "
                f"WHERE content_hash IS NULL AND embedding_status = 'PENDING' "
                f"AND ({x} IS NULL OR typeof({x}) != 'text' OR trim({x}) = '')"
            )
            failed = cur.rowcount
        hashed = 0
        q_at = iso(now)
        select = (f"SELECT {i}, {x} FROM {t} WHERE content_hash IS NULL AND embedding_status = 'PENDING' "
                  f"LIMIT {HASH_SLICE}")
        update = f"UPDATE {t} SET content_hash = ?, queued_at = coalesce(queued_at, ?) WHERE {i} = ?"
        while True:
            with self.transaction() as c:
                rows = c.execute(select).fetchall()
                if not rows:
                    break
                c.executemany(update, [(hasher(text), q_at, cid) for cid, text in rows])
                hashed += len(rows)
            if len(rows) < HASH_SLICE:
                break
        return hashed, failed

    def copy_known_vectors(self, now: float) -> int:
        """Pending chunks whose content hash already has a vector get a copy of it, locally (never pay twice)."""
        t, i = self.t, self.id
        copied = 0
        find = (
            f"SELECT p.{i}, r.{i} FROM {t} p JOIN {t} r ON r.content_hash = p.content_hash "
            f"AND r.embedding_status = 'READY' "
            f"WHERE p.embedding_status = 'PENDING' AND p.batch_job_id IS NULL AND p.content_hash IS NOT NULL "
            f"GROUP BY p.{i} LIMIT 2000"
        )
        stamp = iso(now)
        while True:
            with self.transaction() as c:
                pairs = c.execute(find).fetchall()
                if not pairs:
                    break
                vecs = []
                for dst, src in pairs:
                    row = c.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (src,)).fetchone()
                    if row is not None:
                        vecs.append((dst, row[0]))
                if not vecs:
                    break
                self._write_vectors(c, vecs, stamp)
                copied += len(vecs)
            if len(pairs) < 2000:
                break
        return copied

    def pending_summary(self) -> tuple[int, str | None]:
        """(number of claimable pending chunks, queued_at of the oldest)."""
        t = self.t
        n = self._conn.execute(
            f"SELECT count(*) FROM {t} WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL "
            "AND content_hash IS NOT NULL"
        ).fetchone()[0]
        oldest = self._conn.execute(
            f"SELECT min(queued_at) FROM {t} WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL"
        ).fetchone()[0]
        return int(n), oldest

    def count_active_batches(self) -> int:
        return int(self._conn.execute(
            "SELECT count(*) FROM batch_jobs WHERE status IN ('PENDING', 'RUNNING')").fetchone()[0])

    def claim_batch(self, max_size: int, model: str, now: float) -> tuple[int, int] | None:
        """Create a PENDING batch row and claim up to ``max_size`` pending chunks for it, in one transaction.

        Chunks whose text is already in flight in another batch are left for later (they will be copied
        from that batch's vector). Returns (batch_id, chunks) or None when nothing is claimable.
        """
        t, i = self.t, self.id
        stamp = iso(now)
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO batch_jobs(status, model, total_chunks, created_at, updated_at) "
                "VALUES ('PENDING', ?, 0, ?, ?)", (model, stamp, stamp))
            batch_id = int(cur.lastrowid)
            cur = c.execute(
                f"UPDATE {t} SET batch_job_id = ? WHERE {i} IN ("
                f"SELECT p.{i} FROM {t} p WHERE p.embedding_status = 'PENDING' AND p.batch_job_id IS NULL "
                f"AND p.content_hash IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {t} f "
                # "+": look up by content_hash (hash index), never by scanning every in-flight row of the
                # batch index per pending chunk (quadratic: 100,000 chunks took minutes to claim).
                f"WHERE f.content_hash = p.content_hash AND +f.batch_job_id IS NOT NULL) "
                f"ORDER BY p.{i} LIMIT ?)", (batch_id, max_size))
            n = cur.rowcount
            if n <= 0:
                c.execute("DELETE FROM batch_jobs WHERE id = ?", (batch_id,))
                return None
            c.execute("UPDATE batch_jobs SET total_chunks = ? WHERE id = ?", (n, batch_id))
        return batch_id, n

    def batch_items(self, batch_id: int) -> Iterator[Item]:
        """The distinct texts of a batch's in-flight chunks, one Item per content hash (streamed)."""
        cur = self._conn.execute(
            f"SELECT content_hash, {self.text} FROM {self.t} WHERE batch_job_id = ? "
            "AND embedding_status = 'PENDING' GROUP BY content_hash", (batch_id,))
        for key, text in cur:
            yield Item(key, text)

    def batch_chunk_count(self, batch_id: int) -> int:
        return int(self._conn.execute(
            f"SELECT count(*) FROM {self.t} WHERE batch_job_id = ? AND embedding_status = 'PENDING'",
            (batch_id,)).fetchone()[0])

    def mark_submitted(self, batch_id: int, job_name: str, now: float,
                       input_uri: str | None = None, output_uri: str | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE batch_jobs SET google_job_id = ?, status = 'RUNNING', input_uri = coalesce(?, input_uri), "
                "output_uri = coalesce(?, output_uri), error_message = NULL, updated_at = ? WHERE id = ?",
                (job_name, input_uri, output_uri, iso(now), batch_id))

    def note_batch_error(self, batch_id: int, error: str, now: float) -> None:
        """Record a transient problem on a batch (it stays as it is and is retried)."""
        with self.transaction() as c:
            c.execute("UPDATE batch_jobs SET error_message = ?, updated_at = ? WHERE id = ?",
                      (error[:2000], iso(now), batch_id))

    def set_remote_state(self, batch_id: int, state: str, now: float, output_uri: str | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE batch_jobs SET remote_state = ?, output_uri = coalesce(?, output_uri), updated_at = ? "
                "WHERE id = ? AND (remote_state IS NOT ? OR ? IS NOT NULL)",
                (state, output_uri, iso(now), batch_id, state, output_uri))

    # ------------------------------------------------------------------ sync

    def apply_results(self, batch_id: int, lines: Sequence[ResultLine], max_attempts: int, now: float) -> ApplyCounts:
        """Apply one slice of result lines in one transaction. Idempotent.

        Only chunks still claimed by this batch are touched: a chunk whose text changed or that was deleted
        while in flight was released by the triggers, so its (stale) result is dropped here.
        """
        t, i = self.t, self.id
        stamp = iso(now)
        vec_size = 4 * self.dimensions
        ok_keys: list[tuple[str, bytes]] = []
        err_keys: list[tuple[str, str]] = []
        tokens = 0
        for line in lines:
            if line.vector is not None and len(line.vector) == vec_size:
                ok_keys.extend((k, line.vector) for k in line.keys)
                tokens += line.token_count or 0
            else:
                reason = line.error or (
                    f"vector has {len(line.vector) // 4} dimensions, expected {self.dimensions}"
                    if line.vector is not None else "no vector in result")
                err_keys.extend((k, reason) for k in line.keys)
        applied = errored = failed = 0
        blobs: dict[str, bytes] = {}
        for key, blob in ok_keys:
            blobs.setdefault(key, blob)  # the first answer for a text wins, as before
        keys = list(blobs)
        with self.transaction() as c:
            # One IN query per IN_SLICE keys (through the batch index), not one SELECT per key.
            vecs: list[tuple[int, bytes]] = []
            for start in range(0, len(keys), IN_SLICE):
                part = keys[start:start + IN_SLICE]
                rows = c.execute(
                    f"SELECT {i}, content_hash FROM {t} WHERE batch_job_id = ? AND embedding_status = 'PENDING' "
                    f"AND content_hash IN ({', '.join('?' * len(part))})", (batch_id, *part))
                vecs.extend((cid, blobs[key]) for cid, key in rows)
            vecs.sort(key=lambda v: v[0])  # id order: neighbouring pages for the UPDATE and vec0 writes
            seen: set[str] = set(keys)
            if vecs:
                self._write_vectors(c, vecs, stamp)
                applied = len(vecs)
            for key, reason in err_keys:
                if key in seen:
                    continue  # a success for the same text already landed in this slice
                seen.add(key)
                e, f = self._retry_chunks(c, "batch_job_id = ? AND content_hash = ? AND embedding_status = 'PENDING'",
                                          (batch_id, key), reason, max_attempts)
                errored += e
                failed += f
            c.execute(
                "UPDATE batch_jobs SET completed_chunks = completed_chunks + ?, failed_chunks = failed_chunks + ?, "
                "token_count = coalesce(token_count, 0) + ?, updated_at = ? WHERE id = ?",
                (applied, errored, tokens, stamp, batch_id))
        return ApplyCounts(applied, errored, failed, tokens)

    def _write_vectors(self, c: Any, vecs: list[tuple[int, bytes]], stamp: str) -> None:
        """sqlite-vec 0.1.9 has no INSERT OR REPLACE on vec0: DELETE then INSERT, same transaction."""
        ids = [(cid,) for cid, _ in vecs]
        c.executemany("DELETE FROM chunks_vec WHERE chunk_id = ?", ids)
        c.executemany("INSERT INTO chunks_vec(chunk_id, embedding) VALUES (?, ?)", vecs)
        c.executemany(
            f"UPDATE {self.t} SET embedding_status = 'READY', batch_job_id = NULL, error_message = NULL, "
            f"embedded_at = ? WHERE {self.id} = ?", [(stamp, cid) for cid, _ in vecs])
        c.executemany("DELETE FROM batchd_tombstones WHERE chunk_id = ?", ids)

    def _retry_chunks(self, c: Any, where: str, params: tuple, reason: str, max_attempts: int) -> tuple[int, int]:
        """attempts+1, release from the batch; FAILED once attempts reach max_attempts. Returns (n, failed)."""
        t = self.t
        failed = c.execute(
            f"SELECT count(*) FROM {t} WHERE {where} AND attempts + 1 >= ?", (*params, max_attempts)).fetchone()[0]
        cur = c.execute(
            f"UPDATE {t} SET attempts = attempts + 1, error_message = ?, batch_job_id = NULL, "
            f"embedding_status = CASE WHEN attempts + 1 >= ? THEN 'FAILED' ELSE 'PENDING' END WHERE {where}",
            (reason[:2000], max_attempts, *params))
        return cur.rowcount, int(failed)

    def finish_batch(self, batch_id: int, max_attempts: int, now: float, *, status: str = "COMPLETED",
                     error: str | None = None, missing_reason: str = "missing from the job's output") -> tuple[int, int]:
        """Close a batch whose results were all applied (or whose job failed).

        Every chunk still claimed by it counts one failed attempt with ``error`` (or ``missing_reason``).
        Returns (requeued_or_failed, of_which_failed). Idempotent.
        """
        stamp = iso(now)
        with self.transaction() as c:
            n, f = self._retry_chunks(c, "batch_job_id = ? AND embedding_status = 'PENDING'", (batch_id,),
                                      error or missing_reason, max_attempts)
            c.execute(
                "UPDATE batch_jobs SET status = ?, error_message = coalesce(?, error_message), "
                "failed_chunks = failed_chunks + ?, finished_at = coalesce(finished_at, ?), updated_at = ? "
                "WHERE id = ?", (status, error, n, stamp, stamp, batch_id))
        return n, f

    def cancel_batch_locally(self, batch_id: int, reason: str, now: float) -> int:
        """Release a batch's chunks back to PENDING without counting an attempt, and mark it FAILED."""
        stamp = iso(now)
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE {self.t} SET batch_job_id = NULL, error_message = ? WHERE batch_job_id = ?",
                (reason, batch_id))
            c.execute(
                "UPDATE batch_jobs SET status = 'FAILED', error_message = ?, finished_at = coalesce(finished_at, ?), "
                "updated_at = ? WHERE id = ?", (reason, stamp, stamp, batch_id))
            return cur.rowcount

    # ------------------------------------------------------------------ reading

    def batches(self, statuses: Iterable[str] | None = None, limit: int | None = None) -> list[BatchRow]:
        sql = f"SELECT {', '.join(_BATCH_COLS)} FROM batch_jobs"
        params: list[Any] = []
        if statuses is not None:
            st = list(statuses)
            sql += f" WHERE status IN ({', '.join('?' * len(st))})"
            params += st
        sql += " ORDER BY id DESC" if limit else " ORDER BY id"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return [BatchRow(*r) for r in self._conn.execute(sql, params)]

    def batch(self, batch_id: int) -> BatchRow | None:
        r = self._conn.execute(f"SELECT {', '.join(_BATCH_COLS)} FROM batch_jobs WHERE id = ?", (batch_id,)).fetchone()
        return BatchRow(*r) if r else None

    def queue_stats(self) -> dict[str, Any]:
        """Chunk counts per state and batch counts per status, in one read transaction.

        READY is the total minus the other states (every chunk is in exactly one): counting the biggest
        group entry by entry is what made this slow (~35 ms per million); the total is counted page by page
        over the narrow status index (~5 ms per million), the others are range scans (PENDING over the narrow
        index too, minus those in flight), so the cost grows with the chunks that are not READY.
        """
        t = self.t
        row = self._conn.execute(
            f"SELECT "
            f"(SELECT count(*) FROM {t} WHERE embedding_status = 'PENDING'), "
            f"(SELECT count(*) FROM {t} WHERE embedding_status = 'PENDING' AND batch_job_id IS NOT NULL), "
            f"(SELECT count(*) FROM {t} WHERE embedding_status = 'FAILED'), "
            f"(SELECT count(*) FROM {t})").fetchone()
        batches = {"PENDING": 0, "RUNNING": 0, "COMPLETED": 0, "FAILED": 0}
        for status, n in self._conn.execute("SELECT status, count(*) FROM batch_jobs GROUP BY status"):
            batches[status] = n
        all_pending, running, failed, total = row
        return {"pending": all_pending - running, "running": running, "ready": total - all_pending - failed,
                "failed": failed, "batches": batches}

    def chunk(self, chunk_id: int) -> dict[str, Any] | None:
        cur = self._conn.execute(
            f"SELECT {self.id}, {self.text}, embedding_status, batch_job_id, error_message, attempts, content_hash, "
            f"embedded_at FROM {self.t} WHERE {self.id} = ?", (chunk_id,))
        r = cur.fetchone()
        if r is None:
            return None
        keys = ("id", "text", "embedding_status", "batch_job_id", "error_message", "attempts", "content_hash",
                "embedded_at")
        return dict(zip(keys, r))

    def chunks(self) -> list[dict[str, Any]]:
        """Every chunk with batchd's columns (for tests and small tools; not for big tables)."""
        keys = ("id", "text", "embedding_status", "batch_job_id", "error_message", "attempts", "content_hash")
        cur = self._conn.execute(
            f"SELECT {self.id}, {self.text}, embedding_status, batch_job_id, error_message, attempts, content_hash "
            f"FROM {self.t} ORDER BY {self.id}")
        return [dict(zip(keys, r)) for r in cur]

    def vector(self, chunk_id: int) -> bytes | None:
        row = self._conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (chunk_id,)).fetchone()
        return bytes(row[0]) if row else None

    def vector_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM chunks_vec").fetchone()[0])

    def search(self, query: bytes, k: int) -> list[tuple[int, float, str]]:
        """KNN over chunks_vec: (chunk_id, cosine distance, text). Uses `k = ?` (works before SQLite 3.41)."""
        rows = self._conn.execute(
            f"SELECT v.chunk_id, v.distance, c.{self.text} FROM "
            f"(SELECT chunk_id, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ?) v "
            f"JOIN {self.t} c ON c.{self.id} = v.chunk_id ORDER BY v.distance", (query, k)).fetchall()
        return [(int(r[0]), float(r[1]), r[2]) for r in rows]

    # ------------------------------------------------------------------ operator actions

    def failure_reasons(self, limit: int = 5) -> list[tuple[str, int]]:
        """The most common error_message among FAILED chunks, with counts (through the status index)."""
        rows = self._conn.execute(
            f"SELECT coalesce(error_message, '(no reason recorded)'), count(*) FROM {self.t} "
            "WHERE embedding_status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?", (limit,)).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def retry_failed(self, now: float) -> int:
        """FAILED chunks back to PENDING with attempts reset (their text will be re-hashed)."""
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE {self.t} SET embedding_status = 'PENDING', attempts = 0, error_message = NULL, "
                "batch_job_id = NULL, content_hash = NULL, queued_at = ? WHERE embedding_status = 'FAILED'",
                (iso(now),))
            return cur.rowcount


_BATCH_COLS = ("id", "google_job_id", "status", "total_chunks", "completed_chunks", "failed_chunks", "error_message",
               "model", "input_uri", "output_uri", "remote_state", "token_count", "created_at", "updated_at",
               "finished_at")


def _q(name: str) -> str:
    """Quote an identifier (config validated it as a plain identifier already)."""
    return '"' + name.replace('"', '""') + '"'


def _load_vec(conn: Any) -> None:
    import sqlite_vec

    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise StoreError(f"cannot load the sqlite-vec extension: {e}") from None


# ---------------------------------------------------------------------- migrations
# Small named steps, run in order, each in its own transaction; batchd_meta.schema_version records the last.

_CHUNK_COLUMNS = (
    ("embedding_status", "TEXT NOT NULL DEFAULT 'PENDING'"),
    ("batch_job_id", "INTEGER REFERENCES batch_jobs(id)"),
    ("error_message", "TEXT"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("content_hash", "TEXT"),
    ("embedded_at", "TEXT"),
    ("queued_at", "TEXT"),
)


def m001_initial(store: Store) -> None:
    """batch_jobs, batchd's columns on the (possibly existing) chunks table, their indexes, chunks_vec."""
    db = store.config.database
    t, i, x = store.t, store.id, store.text
    store.execute_ddl(
        "CREATE TABLE IF NOT EXISTS batch_jobs ("
        "id INTEGER PRIMARY KEY, google_job_id TEXT, "
        "status TEXT NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED')), "
        "total_chunks INTEGER NOT NULL DEFAULT 0, completed_chunks INTEGER NOT NULL DEFAULT 0, "
        "failed_chunks INTEGER NOT NULL DEFAULT 0, error_message TEXT, model TEXT, input_uri TEXT, "
        "output_uri TEXT, remote_state TEXT, token_count INTEGER, created_at TEXT NOT NULL, "
        "updated_at TEXT NOT NULL, finished_at TEXT)")
    store.execute_ddl("CREATE INDEX IF NOT EXISTS batch_jobs_google_job_id ON batch_jobs(google_job_id)")
    store.execute_ddl("CREATE INDEX IF NOT EXISTS batch_jobs_status ON batch_jobs(status)")
    if not store.table_exists(db.chunks_table):
        store.execute_ddl(f"CREATE TABLE {t} ({i} INTEGER PRIMARY KEY, {x} TEXT NOT NULL)")
    have = {c.lower() for c in store.table_columns(db.chunks_table)}
    for name, decl in _CHUNK_COLUMNS:
        if name not in have:
            # Existing rows take the default: every app row starts PENDING.
            store.execute_ddl(f"ALTER TABLE {t} ADD COLUMN {name} {decl}")
    p = db.chunks_table
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {_q('batchd_' + p + '_queue')} "
                      f"ON {t}(embedding_status, batch_job_id, queued_at)")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {_q('batchd_' + p + '_hash')} ON {t}(content_hash)")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {_q('batchd_' + p + '_batch')} "
                      f"ON {t}(batch_job_id, content_hash) WHERE batch_job_id IS NOT NULL")
    if store.vec_dimensions() is None:
        # chunk_size=128 (default 1024): vec0 writes each vector into its chunk's blob, and each write walks
        # that blob's overflow-page chain; at 768 dims a 1024-vector chunk is a 3 MB chain and inserts run
        # ~4x slower. KNN time is the same (bench/, README "Benchmarks").
        store.execute_ddl(
            f"CREATE VIRTUAL TABLE chunks_vec USING vec0(chunk_id integer primary key, "
            f"embedding float[{store.dimensions}] distance_metric=cosine, chunk_size=128)")


def m002_triggers(store: Store) -> None:
    """Re-queue a chunk whose text the app changes; schedule removal of vectors of changed/deleted chunks.

    The triggers never touch chunks_vec: the app's own connection usually has no sqlite-vec loaded, and a
    trigger naming a vec0 table would make the app's UPDATE/DELETE fail with "no such module: vec0". They
    write a tombstone instead; batchd deletes those vectors at its next cycle (Store.purge_tombstones).
    """
    db = store.config.database
    t, i, x = store.t, store.id, store.text
    p = db.chunks_table
    store.execute_ddl("CREATE TABLE IF NOT EXISTS batchd_tombstones (chunk_id INTEGER PRIMARY KEY)")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {_q('batchd_' + p + '_text_changed')} AFTER UPDATE OF {x} ON {t} "
        f"WHEN OLD.{x} IS NOT NEW.{x} BEGIN "
        f"UPDATE {t} SET embedding_status = 'PENDING', batch_job_id = NULL, content_hash = NULL, attempts = 0, "
        f"error_message = NULL, embedded_at = NULL, queued_at = NULL WHERE {i} = NEW.{i}; "
        f"INSERT OR IGNORE INTO batchd_tombstones(chunk_id) VALUES (NEW.{i}); END")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {_q('batchd_' + p + '_deleted')} AFTER DELETE ON {t} BEGIN "
        f"INSERT OR IGNORE INTO batchd_tombstones(chunk_id) VALUES (OLD.{i}); END")


def m003_status_index(store: Store) -> None:
    """The narrowest index on every chunk: count(*) walks its pages without decoding rows (Store.queue_stats)."""
    p = store.config.database.chunks_table
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {_q('batchd_' + p + '_status')} ON {store.t}(embedding_status)")


STEPS: list[Callable[[Store], None]] = [m001_initial, m002_triggers, m003_status_index]
