"""batchd's schema inside the application's database: migrations, the instance id, and what batchd checks of
the application's table (through sqlite-utils' read-only introspection).

Migrations are small named functions run in order, each in its own transaction; ``batchd_meta.schema_version``
records the last one applied. They are append-only: a change to the schema is a new step at the end of STEPS.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from batchd.store.connection import SchemaMismatch, StoreBase, StoreError, claimed_before, iso, quote_ident
from batchd.store.ledger import LEDGER_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    from batchd.store import Store


class SchemaMixin(StoreBase):
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
        # The config was checked against the database before (Store.open): nothing below can be refused half way.
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
        self.instance_id = self._ensure_instance_id()
        self._check_copy()

    def _check_copy(self) -> None:
        """Make a copied or restored database file an instance of its own (issue 9, item 4).

        Two signs that this file is not the one its instance id has been working for:

        - a copy — a restored backup, a staging clone, the file moved to another filesystem — is another file:
          its inode differs from ``batchd_meta.database_file``, recorded when the instance id was made;
        - a backup written over the original in place keeps the inode but goes back in time: the lock file
          (keyed on the inode, see :func:`~batchd.store.connection.lock_path`) remembers a higher batch id
          claimed for this instance than the database now holds.

        Left alone, such a file would adopt, poll, cancel and clean up the original's jobs and staged files, and
        label its own new jobs like the original's (reusing its batch ids). So it gets a new random instance id
        (its jobs and staging paths are its own from now on) and its batches in flight are closed WITHOUT
        touching their jobs, which belong to the original: their chunks are queued again, no attempt counted.
        The same file under another name (a symlink, a hard link, a move within its filesystem) keeps its id.
        """
        path = self.config.database.path
        if path == ":memory:":
            return
        inode = str(os.stat(os.path.realpath(path)).st_ino)
        get = "SELECT value FROM batchd_meta WHERE key = 'database_file'"
        row = self._conn.execute(get).fetchone()
        if row is None or row[0] != inode:
            with self.transaction() as c:
                row = c.execute(get).fetchone()  # again, under the write lock: another process may have done it
                c.execute("INSERT INTO batchd_meta(key, value) VALUES ('database_file', ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (inode,))
                if row is not None and row[0] != inode:
                    self._become_new_instance(c, "database copied or restored")
            return
        claimed = claimed_before(path)
        if claimed and claimed[0] == self.instance_id:
            top_sql = "SELECT coalesce(max(id), 0) FROM batch_jobs"
            if self._conn.execute(top_sql).fetchone()[0] >= claimed[1]:
                return  # the usual case, decided by a read: opening for stats or jobs never waits for the write lock
            with self.transaction() as c:
                top = c.execute(top_sql).fetchone()[0]  # again, under the write lock
                if top < claimed[1] and self._instance_in(c) == self.instance_id:
                    self._become_new_instance(
                        c, f"database restored to an earlier state (batch {claimed[1]} was claimed before, the "
                           f"file now ends at batch {top})")

    def _instance_in(self, c: Any) -> str:
        return str(c.execute("SELECT value FROM batchd_meta WHERE key = 'instance_id'").fetchone()[0])

    def _become_new_instance(self, c: Any, why: str) -> None:
        """Inside a write transaction: a new instance id; in-flight batches closed, their jobs left alone."""
        old, new, stamp = self._instance_in(c), secrets.token_hex(6), iso(time.time())
        reason = (f"{why} (it was instance {old}, now {new}): this batch's job belongs to the original and was "
                  "left alone; its chunks are queued again")
        # The job name is moved into the message: nothing in the copy can reach the original's job any more.
        batches = c.execute(
            "UPDATE batch_jobs SET status = 'FAILED', "
            "error_message = ? || coalesce(' (job ' || google_job_id || ')', ''), google_job_id = NULL, "
            "finished_at = coalesce(finished_at, ?), updated_at = ? WHERE status IN ('PENDING', 'RUNNING')",
            (reason, stamp, stamp)).rowcount
        chunks = c.execute(f"UPDATE {self.q_table} SET batch_job_id = NULL WHERE batch_job_id IS NOT NULL").rowcount
        c.execute("UPDATE batchd_meta SET value = ? WHERE key = 'instance_id'", (new,))
        c.execute("INSERT INTO batchd_meta(key, value) VALUES ('copied_from', ?) "
                  "ON CONFLICT(key) DO UPDATE SET value = value || ' ' || excluded.value", (old,))
        self.instance_id = new
        structlog.get_logger("batchd.store").warning(
            "store.copy_detected", reason=why, previous_instance=old, instance=new, batches_closed=batches,
            chunks_requeued=chunks, database=self.config.database.path)

    def _check_config_fits(self, *, dimensions: bool = True) -> None:
        """Refuse, before changing anything, a config that does not fit this database (SchemaMismatch)."""
        self._check_app_table()
        if dimensions:
            self._check_vec_dimensions()

    def _read_instance_id(self) -> str | None:
        if not self.table_exists("batchd_meta"):
            return None
        row = self._conn.execute("SELECT value FROM batchd_meta WHERE key = 'instance_id'").fetchone()
        return str(row[0]) if row else None

    def _ensure_instance_id(self) -> str:
        have = self._read_instance_id()
        if have:
            return have
        with self.transaction() as c:
            # Lowercase hex: valid as a GCS path segment and as a Vertex label value.
            c.execute("INSERT OR IGNORE INTO batchd_meta(key, value) VALUES ('instance_id', ?)",
                      (secrets.token_hex(6),))
            return str(c.execute("SELECT value FROM batchd_meta WHERE key = 'instance_id'").fetchone()[0])

    def schema_version(self) -> int:
        if not self.table_exists("batchd_meta"):
            return 0
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
        """The configured table, if it exists, has the text column and the id column as its INTEGER PRIMARY KEY.

        chunks_vec is keyed by the chunk's integer id: a TEXT key (or a table WITHOUT ROWID) would pass every
        other step and then fail every vector write, for ever.
        """
        db = self.config.database
        if not self.table_exists(db.chunks_table):
            return
        info = self._conn.execute(f"PRAGMA table_info({self.q_table})").fetchall()  # cid, name, type, nn, dflt, pk
        cols = {str(r[1]).lower(): r for r in info}
        for key, col in (("database.id_column", db.id_column), ("database.text_column", db.text_column)):
            if col.lower() not in cols:
                raise SchemaMismatch(f"table {db.chunks_table} has no column {col!r} (set {key} in the config)",
                                     key, table=db.chunks_table, column=col)
        id_row = cols[db.id_column.lower()]
        pk_cols = [r for r in info if r[5]]
        # A rowid alias: the only key column, declared exactly INTEGER, and no separate key index (a WITHOUT
        # ROWID table and the "INTEGER PRIMARY KEY DESC" quirk both get one).
        pk_index = any(r[3] == "pk" for r in self._conn.execute(f"PRAGMA index_list({self.q_table})"))
        if pk_cols != [id_row] or str(id_row[2]).upper() != "INTEGER" or pk_index:
            declared = (str(id_row[2]) or "untyped") + (" PRIMARY KEY" if id_row[5] else "")
            if pk_index and pk_cols == [id_row] and str(id_row[2]).upper() == "INTEGER":
                declared += " in a table WITHOUT ROWID (or declared DESC)"
            raise SchemaMismatch(
                f"table {db.chunks_table}: database.id_column {db.id_column!r} is {declared}; batchd needs an "
                f"INTEGER PRIMARY KEY (the table's rowid) to key chunks_vec: point database.id_column at such a "
                f"column, or give the table one", "database.id_column",
                table=db.chunks_table, column=db.id_column, declared=declared, required="INTEGER PRIMARY KEY")

    def vec_dimensions(self) -> int | None:
        row = self._conn.execute("SELECT sql FROM sqlite_master WHERE name = 'chunks_vec'").fetchone()
        if not row or not row[0]:
            return None
        m = re.search(r"float\[(\d+)\]", row[0])
        return int(m.group(1)) if m else None

    def _verify_schema(self) -> None:
        if self.vec_dimensions() is None:
            raise SchemaMismatch(f"{self.config.database.path} has no chunks_vec table any more (removed by "
                                 "`batchd uninstall`?): restart batchd to create it again", "database.path",
                                 database=self.config.database.path)
        self._check_vec_dimensions()

    def _check_vec_dimensions(self) -> None:
        have = self.vec_dimensions()
        if have is not None and have != self.dimensions:
            raise SchemaMismatch(
                f"chunks_vec holds {have}-dimension vectors but embedding.dimensions is {self.dimensions}: "
                f"set embedding.dimensions = {have} again, or run `batchd reset-vectors --yes` to drop every "
                f"vector and embed all chunks again at {self.dimensions}", "embedding.dimensions",
                configured_dimensions=self.dimensions, database_dimensions=have, fix="batchd reset-vectors --yes")


# ---------------------------------------------------------------------- migrations
# Small named steps, run in order, each in its own transaction; batchd_meta.schema_version records the last.

# The columns m001 adds to the application's table. A later migration that adds one lists it in
# LATER_CHUNK_COLUMNS: `batchd check` plans from both and `batchd uninstall` removes what is on them
# (tests/test_lifecycle.py compares both with what a real migration does).
CHUNK_COLUMNS = (
    ("embedding_status", "TEXT NOT NULL DEFAULT 'PENDING'"),
    ("batch_job_id", "INTEGER REFERENCES batch_jobs(id)"),
    ("error_message", "TEXT"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("content_hash", "TEXT"),
    ("embedded_at", "TEXT"),
    ("queued_at", "TEXT"),
)
# Columns later migrations add to the application's table (m006), and all of batchd's columns there.
LATER_CHUNK_COLUMNS = (("truncated", "INTEGER NOT NULL DEFAULT 0"),)
OWN_CHUNK_COLUMNS = CHUNK_COLUMNS + LATER_CHUNK_COLUMNS
# batchd's own tables (chunks_vec is a vec0 virtual table) and the indexes on batch_jobs. Indexes and triggers
# batchd puts on the application's table are named batchd_<table>_<what> (own_name).
OWN_TABLES = ("batchd_meta", "batch_jobs", "batchd_tombstones", "batchd_copies", "chunks_vec")
BATCH_JOBS_INDEXES = ("batch_jobs_google_job_id", "batch_jobs_status", "batch_jobs_created_at")
APP_TABLE_INDEXES = ("queue", "hash", "batch", "status", "truncated")
APP_TABLE_TRIGGERS = ("text_changed", "deleted", "replaced")


def own_name(store: Store, what: str) -> str:
    """The name of batchd's index or trigger ``what`` on the application's table."""
    return f"batchd_{store.config.database.chunks_table}_{what}"


def create_vec_table(store: Store) -> None:
    """chunks_vec for the configured dimensions (m001; `batchd reset-vectors`)."""
    # chunk_size=128 (default 1024): vec0 writes each vector into its chunk's blob, and each write walks
    # that blob's overflow-page chain; at 768 dims a 1024-vector chunk is a 3 MB chain, and inserts slow
    # down with it while KNN time does not change (bench/, README "Benchmarks").
    store.execute_ddl(
        f"CREATE VIRTUAL TABLE chunks_vec USING vec0(chunk_id integer primary key, "
        f"embedding float[{store.dimensions}] distance_metric=cosine, chunk_size=128)")


def m001_initial(store: Store) -> None:
    """batch_jobs, batchd's columns on the (possibly existing) chunks table, their indexes, chunks_vec."""
    db = store.config.database
    t, i, x = store.q_table, store.q_id, store.q_text
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
    for name, decl in CHUNK_COLUMNS:
        if name not in have:
            # Existing rows take the default: every app row starts PENDING.
            store.execute_ddl(f"ALTER TABLE {t} ADD COLUMN {name} {decl}")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident(own_name(store, 'queue'))} "
                      f"ON {t}(embedding_status, batch_job_id, queued_at)")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident(own_name(store, 'hash'))} ON {t}(content_hash)")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident(own_name(store, 'batch'))} "
                      f"ON {t}(batch_job_id, content_hash) WHERE batch_job_id IS NOT NULL")
    if store.vec_dimensions() is None:
        create_vec_table(store)


def m002_triggers(store: Store) -> None:
    """Re-queue a chunk whose text the app changes; schedule removal of vectors of changed/deleted chunks.

    The triggers never touch chunks_vec: the app's own connection usually has no sqlite-vec loaded, and a
    trigger naming a vec0 table would make the app's UPDATE/DELETE fail with "no such module: vec0". They
    write a tombstone instead; batchd deletes those vectors at its next cycle (Store.purge_tombstones).
    """
    t, i, x = store.q_table, store.q_id, store.q_text
    store.execute_ddl("CREATE TABLE IF NOT EXISTS batchd_tombstones (chunk_id INTEGER PRIMARY KEY)")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident(own_name(store, 'text_changed'))} AFTER UPDATE OF {x} ON {t} "
        f"WHEN OLD.{x} IS NOT NEW.{x} BEGIN "
        f"UPDATE {t} SET embedding_status = 'PENDING', batch_job_id = NULL, content_hash = NULL, attempts = 0, "
        f"error_message = NULL, embedded_at = NULL, queued_at = NULL WHERE {i} = NEW.{i}; "
        f"INSERT OR IGNORE INTO batchd_tombstones(chunk_id) VALUES (NEW.{i}); END")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident(own_name(store, 'deleted'))} AFTER DELETE ON {t} BEGIN "
        f"INSERT OR IGNORE INTO batchd_tombstones(chunk_id) VALUES (OLD.{i}); END")


def m003_status_index(store: Store) -> None:
    """The narrowest index on every chunk: count(*) walks its pages without decoding rows (Store.queue_stats)."""
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident(own_name(store, 'status'))} "
                      f"ON {store.q_table}(embedding_status)")


def m004_triggers_never_fail(store: Store) -> None:
    """The triggers again, written so that no application write can ever fail because of them (issue 9, item 1).

    A statement with a conflict clause (an UPSERT's DO UPDATE, UPDATE OR ABORT / OR FAIL / OR ROLLBACK)
    imposes its policy on every statement of the triggers it fires, overriding their own ``OR IGNORE``: the
    tombstone insert then failed with "UNIQUE constraint failed: batchd_tombstones.chunk_id" whenever a
    tombstone for that id was still waiting for batchd's next cycle (the text changed twice). Now no trigger
    statement can hit a constraint at all, whatever policy is imposed: the tombstone insert is guarded by
    NOT EXISTS, and the self-update only sets batchd's own unconstrained columns.

    A third trigger covers ``INSERT OR REPLACE`` / ``REPLACE INTO`` over an existing id: SQLite deletes the old row
    without firing delete triggers (recursive_triggers is off), so its vector stayed — stale, and kept for good if
    the new text then failed. A BEFORE INSERT of an id that exists leaves a tombstone; the purge removes the
    vector only if the chunk is not READY by then (an ``INSERT OR IGNORE`` or a no-op UPSERT leaves the row READY,
    and its vector stays). Fresh inserts (no such id yet) pay one primary-key probe, nothing else.
    """
    t, i, x = store.q_table, store.q_id, store.q_text
    p = store.config.database.chunks_table
    changed, deleted = quote_ident("batchd_" + p + "_text_changed"), quote_ident("batchd_" + p + "_deleted")

    def tombstone(ref: str) -> str:
        return (f"INSERT INTO batchd_tombstones(chunk_id) SELECT {ref}.{i} "
                f"WHERE NOT EXISTS (SELECT 1 FROM batchd_tombstones WHERE chunk_id = {ref}.{i});")

    store.execute_ddl(f"DROP TRIGGER IF EXISTS {changed}")
    store.execute_ddl(f"DROP TRIGGER IF EXISTS {deleted}")
    store.execute_ddl(
        f"CREATE TRIGGER {changed} AFTER UPDATE OF {x} ON {t} WHEN OLD.{x} IS NOT NEW.{x} BEGIN "
        f"UPDATE {t} SET embedding_status = 'PENDING', batch_job_id = NULL, content_hash = NULL, attempts = 0, "
        f"error_message = NULL, embedded_at = NULL, queued_at = NULL WHERE {i} = NEW.{i}; "
        f"{tombstone('NEW')} END")
    store.execute_ddl(f"CREATE TRIGGER {deleted} AFTER DELETE ON {t} BEGIN {tombstone('OLD')} END")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident('batchd_' + p + '_replaced')} BEFORE INSERT ON {t} "
        f"WHEN EXISTS (SELECT 1 FROM {t} WHERE {i} = NEW.{i}) BEGIN {tombstone('NEW')} END")


def m005_cost_ledger(store: Store) -> None:
    """The cost ledger: per-batch counts and prices on batch_jobs, local copies per day and model."""
    have = {c.lower() for c in store.table_columns("batch_jobs")}
    for name, decl in LEDGER_COLUMNS:
        if name not in have:
            store.execute_ddl(f"ALTER TABLE batch_jobs ADD COLUMN {name} {decl}")
    store.execute_ddl("CREATE INDEX IF NOT EXISTS batch_jobs_created_at ON batch_jobs(created_at)")
    store.execute_ddl(
        "CREATE TABLE IF NOT EXISTS batchd_copies (day TEXT NOT NULL, model TEXT NOT NULL, "
        "rows INTEGER NOT NULL DEFAULT 0, characters INTEGER NOT NULL DEFAULT 0, "
        "billable_characters INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, model))")


def m006_output_accounting(store: Store) -> None:
    """What a job's output says beyond vectors (issue 10): ``truncated`` per chunk (the service cut its input to
    the model's token limit; a partial index keeps counting them cheap) and ``unmatched_lines`` per batch
    (output lines that named no row: a silent mismatch would look like missing lines forever)."""
    t, p = store.q_table, store.config.database.chunks_table
    if "truncated" not in {c.lower() for c in store.table_columns(p)}:
        store.execute_ddl(f"ALTER TABLE {t} ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident('batchd_' + p + '_truncated')} "
                      f"ON {t}(embedding_status) WHERE truncated = 1")
    if "unmatched_lines" not in {c.lower() for c in store.table_columns("batch_jobs")}:
        store.execute_ddl("ALTER TABLE batch_jobs ADD COLUMN unmatched_lines INTEGER NOT NULL DEFAULT 0")


STEPS: list[Callable[[Store], None]] = [m001_initial, m002_triggers, m003_status_index, m004_triggers_never_fail,
                                      m005_cost_ledger, m006_output_accounting]

SCHEMA_VERSION = len(STEPS)
