"""The store on real files: migrations on blank and existing app databases, the extension fallback, triggers."""

from __future__ import annotations

import sqlite3

import pytest

from batchd.store import SCHEMA_VERSION, STEPS, Store, StoreError
from tests.storehelp import store_chunks


def make_app_db(path, rows=1000):
    """An application's own database: its own columns, an index, 1,000 rows. Plain stdlib sqlite3, no vec."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL, doc_id TEXT, "
                 "position INTEGER, meta JSON)")
    conn.execute("CREATE INDEX chunks_doc ON chunks(doc_id)")
    conn.executemany("INSERT INTO chunks(id, content, doc_id, position, meta) VALUES (?, ?, ?, ?, ?)",
                     [(i, f"paragraph {i} of the manual", f"doc-{i // 10}", i % 10, '{"lang": "en"}')
                      for i in range(1, rows + 1)])
    conn.commit()
    conn.close()


def app_rows(path, module=sqlite3):
    conn = module.connect(path)
    rows = conn.execute("SELECT id, content, doc_id, position, meta FROM chunks ORDER BY id").fetchall()
    conn.close()
    return rows


def test_blank_database_gets_the_whole_schema(make_config):
    cfg = make_config()
    store = Store.open(cfg)
    assert store.schema_version() == SCHEMA_VERSION == len(STEPS)
    assert store.table_exists("chunks") and store.table_exists("batch_jobs") and store.table_exists("batchd_meta")
    assert store.vec_dimensions() == 16
    assert len(store.instance_id) == 12
    cols = store.table_columns("chunks")
    for c in ("embedding_status", "batch_job_id", "error_message", "attempts", "content_hash", "embedded_at"):
        assert c in cols
    instance = store.instance_id
    store.close()
    again = Store.open(cfg)  # idempotent: same instance id, nothing re-created
    assert again.instance_id == instance
    again.close()


def test_existing_app_database_keeps_its_columns_and_rows(make_config, tmp_path):
    db = tmp_path / "app.db"
    make_app_db(db)
    before = app_rows(db)
    store = Store.open(make_config())
    assert app_rows(db, store.sqlite_module) == before
    st = store.queue_stats()
    assert st["pending"] == 1000 and st["ready"] == 0
    assert [c for c in store.table_columns("chunks")][:5] == ["id", "content", "doc_id", "position", "meta"]
    # Same SQLite library as the store while both are open in this process (see Store.sqlite_module).
    conn = store.sqlite_module.connect(db)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'chunks_doc'").fetchone()[0] == 1
    # The app keeps inserting the way it always did: new rows are PENDING without knowing batchd exists.
    conn.execute("INSERT INTO chunks(content, doc_id) VALUES ('new paragraph', 'doc-x')")
    conn.commit()
    conn.close()
    assert store.queue_stats()["pending"] == 1001
    store.close()


def test_upgrade_from_the_oldest_schema(make_config, tmp_path):
    """A database left at schema 1 (before the triggers) is upgraded in place."""
    cfg = make_config()
    make_app_db(tmp_path / "app.db", rows=10)
    store = Store.open(cfg)
    conn = store._conn  # test-only: rewind the schema to version 1 to exercise the upgrade path
    conn.execute("DROP TRIGGER batchd_chunks_text_changed")
    conn.execute("DROP TRIGGER batchd_chunks_deleted")
    conn.execute("DROP TABLE batchd_tombstones")
    conn.execute("DROP INDEX batchd_chunks_status")
    conn.execute("UPDATE batchd_meta SET value = '1' WHERE key = 'schema_version'")
    store.close()
    store = Store.open(cfg)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.table_exists("batchd_tombstones")
    indexes = [r[0] for r in store._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
    assert "batchd_chunks_status" in indexes
    store.close()


def test_newer_schema_is_refused(make_config):
    cfg = make_config()
    Store.open(cfg).close()
    conn = sqlite3.connect(cfg.database.path)
    conn.execute("UPDATE batchd_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this batchd understands"):
        Store.open(cfg)


def test_dimension_mismatch_is_an_error_never_a_recreate(make_config):
    Store.open(make_config()).close()
    with pytest.raises(StoreError, match="chunks_vec holds 16-dimension vectors but embedding.dimensions is 32"):
        Store.open(make_config(embedding={"dimensions": 32}))
    store = Store.open(make_config())
    assert store.vec_dimensions() == 16
    store.close()


def test_app_table_without_the_configured_text_column(make_config, tmp_path):
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, body TEXT)")
    conn.close()
    with pytest.raises(StoreError, match="table chunks has no column 'content' .set database.text_column"):
        Store.open(make_config())
    store = Store.open(make_config(database={"text_column": "body"}))
    store.close()


def test_custom_table_and_column_names(world):
    w = world(database={"chunks_table": "passages", "id_column": "pid", "text_column": "body"})
    w.manager.enqueue([(None, "one"), (None, "two")])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    assert w.manager.get_queue_stats()["ready"] == 2


def test_app_connection_without_sqlite_vec_can_update_and_delete(world):
    """The triggers must not touch vec0, or the app's UPDATE/DELETE fails with 'no such module: vec0'."""
    w = world()
    w.manager.enqueue([(None, "a"), (None, "b")])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    conn = w.app_connect()
    conn.execute("UPDATE chunks SET content = 'a2' WHERE content = 'a'")
    conn.execute("DELETE FROM chunks WHERE content = 'b'")
    conn.commit()
    conn.close()
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    assert w.store.vector_count() == 1
    assert [c["text"] for c in store_chunks(w.store) if c["embedding_status"] == "READY"] == ["a2"]


def test_enqueue_requeues_changed_ids_and_leaves_unchanged_alone(world):
    w = world()
    counts = w.manager.enqueue([(1, "first"), (2, "second"), (None, "third")])
    assert (counts.inserted, counts.requeued, counts.unchanged) == (3, 0, 0)
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    embedded = {c["id"]: c for c in store_chunks(w.store)}
    counts = w.manager.enqueue([(1, "first"), (2, "second, edited")])
    assert (counts.inserted, counts.requeued, counts.unchanged) == (0, 1, 1)
    after = {c["id"]: c for c in store_chunks(w.store)}
    assert after[1] == embedded[1]  # untouched: still READY, same hash
    assert after[2]["embedding_status"] == "PENDING" and after[2]["text"] == "second, edited"
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    assert w.manager.get_queue_stats()["ready"] == 3


def test_fallback_message_names_what_to_install():
    """On a Python without extension loading and without pysqlite3 the error says exactly what to install."""
    import subprocess
    import sys

    code = (
        "import sys, types\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('pysqlite3'): raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "fake = types.ModuleType('sqlite3'); fake.Connection = type('Connection', (), {})\n"
        "sys.modules['sqlite3'] = fake  # a Python built without loadable extensions\n"
        "from batchd.store import _sqlite_module, StoreError\n"
        "try:\n    _sqlite_module()\nexcept StoreError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pysqlite3-binary" in out and "cannot load extensions" in out
