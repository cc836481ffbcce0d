"""batchd's schema inside the application's database: migrations, the instance id, and what batchd checks of
the application's table (through sqlite-utils' read-only introspection).

Migrations are small named functions run in order, each in its own transaction; ``batchd_meta.schema_version``
records the last one applied. They are append-only: a change to the schema is a new step at the end of STEPS.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchd.store.connection import StoreBase, StoreError, quote_ident

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
    for name, decl in _CHUNK_COLUMNS:
        if name not in have:
            # Existing rows take the default: every app row starts PENDING.
            store.execute_ddl(f"ALTER TABLE {t} ADD COLUMN {name} {decl}")
    p = db.chunks_table
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident('batchd_' + p + '_queue')} "
                      f"ON {t}(embedding_status, batch_job_id, queued_at)")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident('batchd_' + p + '_hash')} ON {t}(content_hash)")
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident('batchd_' + p + '_batch')} "
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
    t, i, x = store.q_table, store.q_id, store.q_text
    p = db.chunks_table
    store.execute_ddl("CREATE TABLE IF NOT EXISTS batchd_tombstones (chunk_id INTEGER PRIMARY KEY)")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident('batchd_' + p + '_text_changed')} AFTER UPDATE OF {x} ON {t} "
        f"WHEN OLD.{x} IS NOT NEW.{x} BEGIN "
        f"UPDATE {t} SET embedding_status = 'PENDING', batch_job_id = NULL, content_hash = NULL, attempts = 0, "
        f"error_message = NULL, embedded_at = NULL, queued_at = NULL WHERE {i} = NEW.{i}; "
        f"INSERT OR IGNORE INTO batchd_tombstones(chunk_id) VALUES (NEW.{i}); END")
    store.execute_ddl(
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident('batchd_' + p + '_deleted')} AFTER DELETE ON {t} BEGIN "
        f"INSERT OR IGNORE INTO batchd_tombstones(chunk_id) VALUES (OLD.{i}); END")


def m003_status_index(store: Store) -> None:
    """The narrowest index on every chunk: count(*) walks its pages without decoding rows (Store.queue_stats)."""
    p = store.config.database.chunks_table
    store.execute_ddl(f"CREATE INDEX IF NOT EXISTS {quote_ident('batchd_' + p + '_status')} ON {store.q_table}(embedding_status)")


STEPS: list[Callable[[Store], None]] = [m001_initial, m002_triggers, m003_status_index]

SCHEMA_VERSION = len(STEPS)
