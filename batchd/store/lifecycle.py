"""The operator's schema commands: look without touching (`batchd check`), start the vectors over
(`batchd reset-vectors`), take batchd out of the application's database (`batchd uninstall`).

- :meth:`LifecycleMixin.inspect` opens the file with ``PRAGMA query_only``, never switches the journal mode, never
  migrates and never runs ``PRAGMA optimize``/ANALYZE: it checks the config against the database
  (:class:`SchemaMismatch`) and lists what the first run will create or migrate (:class:`Change`).
- :meth:`LifecycleMixin.reset_vectors` and :meth:`LifecycleMixin.uninstall` each run in ONE transaction: either
  everything happened or nothing did. The caller holds the worker lock (so no step of another batchd runs
  meanwhile) and has cancelled the batches in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchd.store.connection import StoreBase, StoreError, _connect, _load_vec, _sqlite_module, iso, quote_ident
from batchd.store.schema import (
    APP_TABLE_INDEXES,
    APP_TABLE_TRIGGERS,
    BATCH_JOBS_INDEXES,
    OWN_CHUNK_COLUMNS,
    OWN_TABLES,
    SCHEMA_VERSION,
    create_vec_table,
    own_name,
)

if TYPE_CHECKING:  # pragma: no cover
    from batchd.config import Config


@dataclass(frozen=True)
class Change:
    """One thing the first run (or a migration) will do to the database."""

    kind: str  # "file", "journal_mode", "table", "column", "index", "trigger", "vec_table", "meta"
    name: str
    detail: str = ""

    def __str__(self) -> str:
        verb = {"file": "create the database file", "journal_mode": "switch the journal mode to WAL",
                "column": "add column", "meta": "record"}.get(self.kind, f"create {self.kind.replace('_', ' ')}")
        text = verb if self.kind in ("file", "journal_mode") else f"{verb} {self.name}"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass
class Inspection:
    """What `batchd check` reports about the database, read without changing it."""

    path: str
    exists: bool
    sqlite_version: str
    vec_version: str
    schema_version: int
    instance_id: str | None
    vec_dimensions: int | None
    journal_mode: str
    rows: int | None  # rows in the application's table (None: no table yet)
    changes: list[Change] = field(default_factory=list)
    integrity: tuple[str, list[str]] = ("", [])  # which check ran, the problems it found (reads.py, integrity)


class LifecycleMixin(StoreBase):
    # ------------------------------------------------------------------ check

    @classmethod
    def inspect(cls, config: Config) -> Inspection:
        """Look at the configured database without changing it.

        A missing file is inspected as an empty database (``exists=False``; every change is listed).
        Raises :class:`SchemaMismatch` when the config does not fit, StoreError when the file cannot be read.
        """
        from batchd.store.problems import ReadOnly, _read_only, explain

        sqlite = _sqlite_module()
        path = config.database.path
        exists = path == ":memory:" or Path(path).exists()
        if exists:
            if path != ":memory:" and _read_only(path):
                raise ReadOnly("the database is read-only (the file, its folder or its file system is not writable "
                               "by this user): batchd needs write access to the file and to its folder (for the "
                               "-wal and -shm files)")
            conn = _connect(sqlite, path, create=False)
        else:
            _connect_folder_check(sqlite, path)
            conn = sqlite.connect(":memory:", isolation_level=None)
        try:
            conn.execute("PRAGMA query_only = ON")  # belt and braces: this connection cannot write
            conn.execute("PRAGMA busy_timeout = 10000")
            _load_vec(conn)
            store = cls(conn, config, sqlite)
            integrity = store.integrity() if exists else ("", [])  # type: ignore[attr-defined]
            if integrity[1]:  # a damaged file: what else it says cannot be trusted
                return Inspection(path=path, exists=True, sqlite_version=store.sqlite_version,
                                  vec_version=store.vec_version(), schema_version=0, instance_id=None,
                                  vec_dimensions=None, journal_mode="", rows=None, integrity=integrity)
            store._check_config_fits()  # type: ignore[attr-defined]
            rows = None
            if store.table_exists(config.database.chunks_table):  # type: ignore[attr-defined]
                rows = int(conn.execute(f"SELECT count(*) FROM {store.q_table}").fetchone()[0])
            return Inspection(
                path=path, exists=exists, sqlite_version=store.sqlite_version, vec_version=store.vec_version(),
                schema_version=store.schema_version(),  # type: ignore[attr-defined]
                instance_id=store._read_instance_id(),  # type: ignore[attr-defined]
                vec_dimensions=store.vec_dimensions(),  # type: ignore[attr-defined]
                journal_mode=str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() if exists else "",
                rows=rows, changes=store.planned_changes(exists=exists), integrity=integrity)
        except sqlite.DatabaseError as e:
            raise explain(e, path) or StoreError(f"cannot read database {path}: {e}") from None
        finally:
            conn.close()  # no PRAGMA optimize: that may run ANALYZE, a write

    def planned_changes(self, *, exists: bool = True) -> list[Change]:
        """What opening this database for work would create or migrate, in order (empty when up to date)."""
        db = self.config.database
        schema = {(r[0], r[1]) for r in self._conn.execute("SELECT type, name FROM sqlite_master")}
        tables = {name for kind, name in schema if kind == "table"}
        out: list[Change] = []
        if not exists:
            out.append(Change("file", db.path))
        elif db.path != ":memory:":
            mode = str(self._conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode != "wal":
                out.append(Change("journal_mode", "wal", f"now {mode}"))
        for name in ("batchd_meta", "batch_jobs"):
            if name not in tables:
                out.append(Change("table", name))
        for name in BATCH_JOBS_INDEXES:
            if ("index", name) not in schema:
                out.append(Change("index", name, "on batch_jobs"))
        if db.chunks_table not in tables:
            out.append(Change("table", db.chunks_table,
                              f"{db.id_column} INTEGER PRIMARY KEY, {db.text_column} TEXT NOT NULL"))
            have: set[str] = set()
        else:
            have = {c.lower() for c in self.table_columns(db.chunks_table)}  # type: ignore[attr-defined]
        missing = [(n, decl) for n, decl in OWN_CHUNK_COLUMNS if n not in have]
        for name, decl in missing:
            detail = decl
            if name == "embedding_status" and db.chunks_table in tables:
                n = self._conn.execute(f"SELECT count(*) FROM {self.q_table}").fetchone()[0]
                detail += f"; the table's {n:,} existing rows start PENDING and will be embedded"
            out.append(Change("column", f"{db.chunks_table}.{name}", detail))
        for what in APP_TABLE_INDEXES:
            if ("index", own_name(self, what)) not in schema:  # type: ignore[arg-type]
                out.append(Change("index", own_name(self, what), f"on {db.chunks_table}"))  # type: ignore[arg-type]
        for name in ("batchd_tombstones", "batchd_copies"):
            if name not in tables:
                out.append(Change("table", name))
        for what in APP_TABLE_TRIGGERS:
            if ("trigger", own_name(self, what)) not in schema:  # type: ignore[arg-type]
                out.append(Change("trigger", own_name(self, what), f"on {db.chunks_table}"))  # type: ignore[arg-type]
        if "chunks_vec" not in tables:
            out.append(Change("vec_table", "chunks_vec", f"vec0, float[{self.dimensions}], cosine distance"))
        version = self.schema_version()  # type: ignore[attr-defined]
        if version < SCHEMA_VERSION:
            out.append(Change("meta", "schema_version", f"{version} -> {SCHEMA_VERSION}"))
        if not self._read_instance_id():  # type: ignore[attr-defined]
            out.append(Change("meta", "instance_id", "random, labels this database's remote jobs"))
        return out

    # ------------------------------------------------------------------ reset-vectors

    def reset_summary(self) -> dict[str, Any]:
        """What reset_vectors would do: the vector table's size now and after, chunks to re-embed."""
        return {"vectors": self.vector_count(),  # type: ignore[attr-defined]
                "database_dimensions": self.vec_dimensions(),  # type: ignore[attr-defined]
                "dimensions": self.dimensions,
                "chunks": int(self._conn.execute(f"SELECT count(*) FROM {self.q_table}").fetchone()[0]),
                "in_flight": [b.id for b in self.batches(["PENDING", "RUNNING"])]}  # type: ignore[attr-defined]

    def reset_vectors(self, now: float) -> int:
        """Drop chunks_vec, create it for the configured dimensions, and send every chunk back to PENDING.

        Attempts, errors and content hashes are reset (hashes are recomputed for the configured model); the
        texts and the application's columns are not touched. Batches still open are closed as FAILED (the
        caller cancels their remote jobs first). One transaction. Returns the number of chunks re-queued.
        """
        stamp = iso(now)
        with self.transaction() as c:
            c.execute("DROP TABLE IF EXISTS chunks_vec")
            create_vec_table(self)  # type: ignore[arg-type]
            cur = c.execute(
                f"UPDATE {self.q_table} SET embedding_status = 'PENDING', batch_job_id = NULL, attempts = 0, "
                "error_message = NULL, content_hash = NULL, embedded_at = NULL, queued_at = ?", (stamp,))
            n = cur.rowcount
            c.execute("DELETE FROM batchd_tombstones")
            c.execute("UPDATE batch_jobs SET status = 'FAILED', error_message = 'abandoned by reset-vectors', "
                      "finished_at = coalesce(finished_at, ?), updated_at = ? WHERE status IN ('PENDING', 'RUNNING')",
                      (stamp, stamp))
        return n

    # ------------------------------------------------------------------ uninstall

    def uninstall_plan(self) -> list[Change]:
        """batchd's objects present in this database, in the order uninstall removes them."""
        db = self.config.database
        t = db.chunks_table
        out: list[Change] = []
        for kind in ("trigger", "index"):
            for (name,) in self._conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = ? AND tbl_name = ? AND name LIKE 'batchd\\_%' "
                    "ESCAPE '\\' ORDER BY name", (kind, t)):
                out.append(Change(kind, str(name), f"on {t}"))
        have = {c.lower() for c in self.table_columns(t)} if self.table_exists(t) else set()  # type: ignore[attr-defined]
        for name, _ in reversed(OWN_CHUNK_COLUMNS):
            if name in have:
                out.append(Change("column", f"{t}.{name}"))
        for name in OWN_TABLES:
            if self.table_exists(name):  # type: ignore[attr-defined]
                out.append(Change("vec_table" if name == "chunks_vec" else "table", name))
        return out

    def uninstall(self) -> list[Change]:
        """Remove batchd's triggers, indexes, columns and tables in one transaction; the app's data stays.

        The application's own columns, rows, indexes and triggers are left exactly as they were (SQLite's
        DROP COLUMN restores the table's CREATE statement). Returns what was removed.
        """
        plan = self.uninstall_plan()
        t = self.config.database.chunks_table
        with self.transaction() as c:
            for ch in plan:
                try:
                    if ch.kind in ("trigger", "index"):
                        c.execute(f"DROP {ch.kind.upper()} IF EXISTS {quote_ident(ch.name)}")
                    elif ch.kind == "column":
                        c.execute(f"ALTER TABLE {self.q_table} DROP COLUMN {quote_ident(ch.name.split('.', 1)[1])}")
                    else:
                        c.execute(f"DROP TABLE IF EXISTS {quote_ident(ch.name)}")
                except self._sqlite.DatabaseError as e:
                    hint = f" (an index, view or trigger of yours on {t} uses it?)" if ch.kind == "column" else ""
                    raise StoreError(f"cannot remove {ch.kind} {ch.name}: {e}{hint}; nothing was changed") from None
        return plan


def _connect_folder_check(sqlite: Any, path: str) -> None:
    """Raise the same StoreError as opening would when the database's folder does not exist."""
    folder = Path(path).parent
    if not folder.is_dir():
        _connect(sqlite, path, create=False)  # raises, naming the folder


__all__ = ["Change", "Inspection", "LifecycleMixin"]
