"""batchd's place in the application's database: `check` changes nothing, a config that does not fit the
database is exit 78 everywhere, `reset-vectors` and `uninstall`, and only enqueue/run create a missing file.

Real files; the `batchd` command in-process through click's CliRunner (exit status, output, the daemon's JSON
event), the store and the worker stepped in-process, and a second process where a held worker lock is the point.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from batchd.config import load
from batchd.daemon import EXIT_CONFIG, Worker, run_once
from batchd.store import SchemaMismatch, Store
from tests.conftest import MEMBACKEND, Ran, cli
from tests.fakes.membackend import fake_vector, read_counters, set_knobs
from tests.storehelp import store_chunks, store_vector

APP_SCHEMA = [
    "CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL, doc_id TEXT, meta JSON)",
    "CREATE INDEX chunks_doc ON chunks(doc_id)",
    "CREATE TABLE audit (chunk_id INTEGER, at TEXT)",
    "CREATE TRIGGER chunks_audit AFTER INSERT ON chunks BEGIN INSERT INTO audit VALUES (NEW.id, 'now'); END",
    "CREATE VIEW docs AS SELECT doc_id, count(*) AS n FROM chunks GROUP BY doc_id",
]


def make_app_db(path: Path, rows: int = 40, schema: list[str] = APP_SCHEMA) -> None:
    """The application's database, made with the stdlib sqlite3 (no sqlite-vec), in its default journal mode."""
    conn = sqlite3.connect(path)
    for ddl in schema:
        conn.execute(ddl)
    conn.executemany("INSERT INTO chunks(id, content, doc_id, meta) VALUES (?, ?, ?, ?)",
                     [(i, f"paragraph {i} of the manual \u00e9", f"doc-{i // 10}", '{"lang": "en"}')
                      for i in range(1, rows + 1)])
    conn.commit()
    conn.close()


def app_dump(path: Path) -> tuple[list, list, list]:
    """Every schema object and the app's columns, byte for byte, read with the stdlib sqlite3 (no sqlite-vec).

    SQLite's own bookkeeping tables (sqlite_sequence, made by vec0's shadow tables, which SQLite never lets anyone
    drop; sqlite_stat1/4, query-planner statistics from PRAGMA optimize) are not the app's and are left out.
    """
    conn = sqlite3.connect(path)
    try:
        schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' "
                              "ESCAPE '\\' ORDER BY type, name").fetchall()
        rows = conn.execute("SELECT id, typeof(content), hex(content), hex(doc_id), hex(meta) FROM chunks "
                            "ORDER BY id").fetchall()
        audit = conn.execute("SELECT * FROM audit ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return schema, rows, audit


def file_state(folder: Path) -> dict[str, str]:
    """Names and contents (sha256) of every file in a folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def write_config(tmp_path: Path, dims: int = 8, name: str = "batchd.toml", db: Path | None = None,
                 database: str = "") -> Path:
    p = tmp_path / name
    p.write_text(
        f'[database]\npath = "{db or tmp_path / "app.db"}"\n{database}'
        '[queue]\nmin_batch_size = 1\nmax_batch_size = 10\n'
        f'[embedding]\nbackend = "{MEMBACKEND}"\nmodel = "test-model"\ndimensions = {dims}\n')
    return p


def batchd(env: dict[str, str], cfg: Path, *args: str, stdin: str | None = None) -> Ran:
    """`batchd --config CFG ARGS` in this process (click's CliRunner): output and exit status as the console script
    gives them. ``env`` is the subprocess environment of the worker-lock holder; the command itself runs here."""
    return cli("--config", str(cfg), *args, input=stdin)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def schema_objects(path: Path, table: str = "chunks") -> set[tuple[str, str]]:
    """(kind, name) of every table, index and trigger, and ("column", "chunks.x") of the app table's columns."""
    conn = sqlite3.connect(path)
    try:
        out = {(k, n) for k, n in conn.execute("SELECT type, name FROM sqlite_master WHERE type IN "
                                               "('table', 'index', 'trigger') AND name NOT LIKE 'sqlite_%'")}
        out |= {("column", f"{table}.{r[1]}") for r in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()
    return out


HOLD_LOCK = """
import sys
from batchd.config import load
from batchd.store import Store
store = Store.open(load(sys.argv[1]))
with store.worker_lock():
    print("held", flush=True)
    sys.stdin.readline()
"""


def hold_worker_lock(env: dict[str, str], cfg: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cfg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


# ---------------------------------------------------------------------------------------------- check


def test_check_changes_nothing_and_lists_what_the_first_run_creates(tmp_path, batchd_env):
    """Before: check created chunks_vec at the configured size (and 7 columns, 4 indexes, 2 triggers, ANALYZE),
    so a later change of embedding.dimensions was refused for ever. Now it only reports."""
    make_app_db(tmp_path / "app.db")
    set_knobs(tmp_path / "testbackend")  # the test backend's check wants its folder
    cfg768, cfg384 = write_config(tmp_path, dims=768), write_config(tmp_path, dims=384, name="384.toml")
    before, schema_before = file_state(tmp_path), schema_objects(tmp_path / "app.db")
    r = batchd(batchd_env, cfg768, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith(f"ok    database {tmp_path / 'app.db'} (sqlite ")
    assert "instance not yet, no chunks_vec yet, 40 chunks)" in lines[1]
    assert lines[2] == "ok    database integrity (integrity_check): no problems found"
    assert lines[3].startswith("plan  the first `batchd run` or `batchd enqueue` will (")
    assert lines[3].endswith(" changes; check made none):")
    assert "plan    switch the journal mode to WAL (now delete)" in lines
    assert ("plan    add column chunks.embedding_status (TEXT NOT NULL DEFAULT 'PENDING'; the table's 40 existing "
            "rows start PENDING and will be embedded)") in lines
    assert "plan    create trigger batchd_chunks_text_changed (on chunks)" in lines
    assert "plan    create vec table chunks_vec (vec0, float[768], cosine distance)" in lines
    assert file_state(tmp_path) == before  # not a byte changed, no -wal/-shm/lock file left behind
    assert schema_objects(tmp_path / "app.db") == schema_before

    # The operator then picks 384 dimensions: nothing was pinned at 768.
    r = batchd(batchd_env, cfg384, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plan    create vec table chunks_vec (vec0, float[384], cosine distance)" in r.stdout.splitlines()
    assert file_state(tmp_path) == before


@pytest.mark.parametrize("upgrade", [False, True], ids=["blank-app-table", "from-schema-1"])
def test_the_plan_is_what_a_real_first_open_does(make_config, tmp_path, upgrade):
    """Store.inspect's list and a real migration agree object for object (a new migration must keep it so)."""
    db = tmp_path / "app.db"
    make_app_db(db)
    cfg = make_config()
    if upgrade:  # a database left at schema 1 (no tombstones, triggers or status index)
        store = Store.open(cfg)
        for ddl in ("DROP TRIGGER batchd_chunks_text_changed", "DROP TRIGGER batchd_chunks_deleted",
                    "DROP TABLE batchd_tombstones", "DROP INDEX batchd_chunks_status",
                    "UPDATE batchd_meta SET value = '1' WHERE key = 'schema_version'"):
            store._conn.execute(ddl)  # test-only: rewind the schema
        store.close()
    before = schema_objects(db)
    plan = Store.inspect(cfg).changes
    assert schema_objects(db) == before
    Store.open(cfg).close()
    created = {o for o in schema_objects(db) - before if not o[1].startswith("chunks_vec_")}  # vec0's own tables
    planned = {("table" if c.kind == "vec_table" else c.kind, c.name) for c in plan
               if c.kind in ("table", "vec_table", "index", "trigger", "column")}
    assert created == planned
    assert ("meta", "schema_version") in {(c.kind, c.name) for c in plan}
    assert Store.inspect(cfg).changes == []


@pytest.mark.parametrize("ddl, declared", [
    ("CREATE TABLE chunks (uuid TEXT PRIMARY KEY, content TEXT)", "TEXT PRIMARY KEY"),
    ("CREATE TABLE chunks (uuid INTEGER PRIMARY KEY, content TEXT) WITHOUT ROWID", "INTEGER PRIMARY KEY in a table"),
    ("CREATE TABLE chunks (uuid INTEGER NOT NULL UNIQUE, content TEXT)", "INTEGER;"),
    ("CREATE TABLE chunks (uuid INT PRIMARY KEY, content TEXT)", "INT PRIMARY KEY"),
])
def test_an_id_column_that_is_not_the_integer_primary_key_is_refused_before_any_change(make_config, tmp_path, ddl,
                                                                                       declared):
    """Before: accepted, and then every vector write failed ("Only integers are allowed for primary key values
    on chunks_vec") at every sync, for ever."""
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute(ddl)
    conn.execute("INSERT INTO chunks VALUES (1, 'a text')")
    conn.commit()
    conn.close()
    before = file_state(tmp_path)
    cfg = make_config(database={"id_column": "uuid"})
    for attempt in (lambda: Store.open(cfg), lambda: Store.inspect(cfg)):
        with pytest.raises(SchemaMismatch) as e:
            attempt()
        assert e.value.key == "database.id_column"
        assert f"database.id_column 'uuid' is {declared}" in str(e.value)
        assert "batchd needs an INTEGER PRIMARY KEY" in str(e.value)
    assert file_state(tmp_path) == before


def test_id_column_refused_in_check_and_at_start_with_exit_78(tmp_path, batchd_env):
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE chunks (uuid TEXT PRIMARY KEY, content TEXT)")
    conn.execute("INSERT INTO chunks VALUES ('a1b2', 'a text')")
    conn.commit()
    conn.close()
    cfg = write_config(tmp_path, database='id_column = "uuid"\n')
    before = file_state(tmp_path)
    r = batchd(batchd_env, cfg, "check")
    assert r.returncode == 78, r.stdout + r.stderr
    assert r.stderr.startswith(f"batchd: config error: {cfg}: database.id_column: table chunks: database.id_column "
                               "'uuid' is TEXT PRIMARY KEY; batchd needs an INTEGER PRIMARY KEY")
    assert len(r.stderr.splitlines()) == 1
    r = batchd(batchd_env, cfg, "run")
    assert r.returncode == 78, r.stdout + r.stderr
    [ev] = [e for e in events(r.stdout) if e["event"] == "config.invalid"]
    assert ev["level"] == "error" and ev["key"] == "database.id_column" and ev["column"] == "uuid"
    assert ev["required"] == "INTEGER PRIMARY KEY" and ev["exit_status"] == 78
    assert file_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------- dimensions


def test_a_dimensions_change_is_exit_78_in_every_command_and_the_daemon(tmp_path, batchd_env):
    """Before: exit 1 with a plain `database error:` line, and systemd restarted the daemon 5 times."""
    store = Store.open(load(write_config(tmp_path, dims=8)))
    store.close()
    cfg16 = write_config(tmp_path, dims=16, name="changed.toml")
    for args in (["stats"], ["enqueue", "-"], ["check"]):
        r = batchd(batchd_env, cfg16, *args, stdin="")
        assert r.returncode == 78, (args, r.stdout, r.stderr)
        assert r.stderr.strip().endswith("chunks_vec holds 8-dimension vectors but embedding.dimensions is 16: set "
                                         "embedding.dimensions = 8 again, or run `batchd reset-vectors --yes` to drop "
                                         "every vector and embed all chunks again at 16"), (args, r.stderr)
    r = batchd(batchd_env, cfg16, "run")
    assert r.returncode == 78, r.stdout + r.stderr
    assert r.stderr == ""
    [ev] = events(r.stdout)  # the daemon's one line: a JSON event, level error (journalctl -p err)
    assert ev["event"] == "config.invalid" and ev["level"] == "error" and ev["exit_status"] == 78
    assert ev["key"] == "embedding.dimensions"
    assert ev["configured_dimensions"] == 16 and ev["database_dimensions"] == 8
    assert ev["fix"] == "batchd reset-vectors --yes"


def test_a_running_worker_stops_with_exit_78_when_the_vectors_are_reset_under_it(world, make_config):
    """reset-vectors run with a new config while an old worker still runs: the worker stops (EX_CONFIG) at its next
    step instead of failing every step with a dimension error."""
    w = world()
    w.manager.enqueue([(None, "one"), (None, "two")])
    worker = Worker(w.manager)
    assert worker.flush(force=True).ok
    other = Store.open(make_config(embedding={"dimensions": 32}), check_dimensions=False)  # reset-vectors' store
    other.reset_vectors(w.clock())
    other.close()
    out = worker.sync()
    assert out.stopped and not out.ok
    assert worker.fatal == EXIT_CONFIG and worker.stop.is_set()
    assert run_once(Worker(w.manager)) == EXIT_CONFIG


# ---------------------------------------------------------------------------------------------- reset-vectors


def test_reset_vectors_says_what_it_would_do_then_re_embeds_everything(world, tmp_path, batchd_env):
    w = world()  # 16 dimensions
    w.manager.enqueue([(None, f"text {i}") for i in range(30)])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    w.manager.enqueue([(None, "in flight")])
    [in_flight] = w.manager.flush_queue(force=True).submitted
    before = {r["id"]: r["text"] for r in store_chunks(w.store)}
    assert w.store.vector_count() == 30
    w.store.close()
    cfg = write_config(tmp_path, dims=32, name="new.toml")

    r = batchd(batchd_env, cfg, "reset-vectors")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"reset-vectors would, in {tmp_path / 'app.db'}:",
        f"  cancel 1 batch(es) in flight: {in_flight}",
        "  drop chunks_vec (30 vectors of 16 dimensions)",
        "  create chunks_vec for 32 dimensions (embedding.dimensions)",
        "  send all 31 chunks back to PENDING, attempts reset, to be embedded with test-model",
        "Texts and your table's other columns are kept.",
        "Nothing changed: run `batchd reset-vectors --yes` to do it (stop the service first).",
    ]
    store = Store.open(load(write_config(tmp_path, dims=16)))
    assert store.vec_dimensions() == 16 and store.vector_count() == 30 and store.batch(in_flight).status == "RUNNING"
    store.close()

    holder = hold_worker_lock(batchd_env, write_config(tmp_path, dims=16))
    try:
        r = batchd(batchd_env, cfg, "reset-vectors", "--yes")
        assert r.returncode == 75, r.stderr
        assert "another batchd process" in r.stderr
        assert r.stderr.startswith("batchd: reset-vectors: ") and len(r.stderr.splitlines()) == 1, r.stderr
    finally:
        holder.communicate("\n", timeout=60)

    r = batchd(batchd_env, cfg, "reset-vectors", "--yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reset-vectors: dropped 30 vectors; chunks_vec is now 32 dimensions; 31 chunks PENDING"
    assert read_counters(w.dir)["cancels"] == 1  # the job in flight was cancelled, not left to run and bill

    new = world(embedding={"dimensions": 32})
    assert new.store.vec_dimensions() == 32 and new.store.vector_count() == 0
    rows = store_chunks(new.store)
    assert {r["id"]: r["text"] for r in rows} == before
    assert {(r["embedding_status"], r["attempts"]) for r in rows} == {("PENDING", 0)}
    assert new.store.batch(in_flight).status == "FAILED"
    new.manager.flush_queue(force=True)
    new.manager.sync_status()
    assert {r["embedding_status"] for r in store_chunks(new.store)} == {"READY"}
    assert all(store_vector(new.store, r["id"]) == fake_vector(r["text"], 32) for r in rows)


# ---------------------------------------------------------------------------------------------- uninstall


def test_uninstall_leaves_the_app_exactly_as_it_was(world, tmp_path, batchd_env):
    db = tmp_path / "app.db"
    make_app_db(db)
    original = app_dump(db)
    w = world()
    w.knobs(fail_texts=["paragraph 7 "])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    st = w.store.queue_stats()
    assert st["ready"] > 0 and st["failed"] + st["pending"] > 0
    w.manager.enqueue([(1, "paragraph 1 of the manual \u00e9")])  # unchanged: stays as it is
    w.store.close()
    cfg = write_config(tmp_path, dims=16)
    installed = app_dump(db)

    r = batchd(batchd_env, cfg, "uninstall")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"uninstall would remove from {db}:"
    for line in ("  trigger batchd_chunks_text_changed", "  index batchd_chunks_status",
                 "  column chunks.embedding_status", "  vec table chunks_vec", "  table batch_jobs"):
        assert line in out
    assert out[-1] == "Nothing changed: run `batchd uninstall --yes` to do it (stop the service first)."
    assert app_dump(db) == installed

    holder = hold_worker_lock(batchd_env, cfg)
    try:
        r = batchd(batchd_env, cfg, "uninstall", "--yes")
        assert r.returncode == 75, r.stderr
        assert r.stderr.startswith("batchd: uninstall: ") and len(r.stderr.splitlines()) == 1, r.stderr
    finally:
        holder.communicate("\n", timeout=60)
    assert app_dump(db) == installed

    r = batchd(batchd_env, cfg, "uninstall", "--yes")
    assert r.returncode == 0, r.stderr
    assert app_dump(db) == original  # every schema object, every byte of the app's columns
    conn = sqlite3.connect(db)  # the app, without sqlite-vec, carries on as before batchd
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.execute("UPDATE chunks SET content = 'changed' WHERE id = 2")
    conn.execute("DELETE FROM chunks WHERE id = 3")
    conn.execute("INSERT INTO chunks(content) VALUES ('new')")
    conn.commit()
    conn.close()
    r = batchd(batchd_env, cfg, "uninstall")
    assert r.returncode == 0 and r.stdout.strip() == f"uninstall: nothing of batchd's is in {db}"


# ---------------------------------------------------------------------------------------------- missing file


def test_only_enqueue_and_run_create_a_missing_database_and_never_its_folders(tmp_path, batchd_env):
    """Before: every command created the folders and an empty database; stats and check reported zeros, exit 0."""
    cfg = write_config(tmp_path)
    db = tmp_path / "app.db"
    for args in (["stats"], ["search", "x"], ["reset-vectors", "--yes"], ["uninstall", "--yes"]):
        r = batchd(batchd_env, cfg, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.strip() == (f"batchd: database {db} does not exist (check database.path; `batchd enqueue` "
                                    "or `batchd run` creates it)"), args
        assert not db.exists()
    typo = write_config(tmp_path, name="typo.toml", db=tmp_path / "stat" / "app.db")
    r = batchd(batchd_env, typo, "enqueue", stdin='{"text": "a"}\n')
    assert r.returncode == 1
    assert r.stderr.strip().startswith(f"batchd: database error: {tmp_path / 'stat' / 'app.db'}: database folder "
                                       f"{tmp_path / 'stat'} does not exist")
    assert not (tmp_path / "stat").exists()
    r = batchd(batchd_env, cfg, "enqueue", stdin='{"text": "a"}\n')
    assert r.returncode == 0, r.stderr
    assert db.exists()


# ---------------------------------------------------------------------------------------------- per-chunk errors


def test_a_chunk_whose_vector_sqlite_refuses_fails_alone_instead_of_the_sync_failing_for_ever(world, tmp_path):
    """Before: one refused row failed the whole slice, so every sync failed the same way, for ever."""
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL, archived INTEGER DEFAULT 0)")
    conn.executemany("INSERT INTO chunks(id, content, archived) VALUES (?, ?, ?)",
                     [(1, "kept", 0), (2, "frozen", 1), (3, "also kept", 0)])
    conn.commit()
    conn.close()
    w = world()
    app = w.app_connect()  # an application rule batchd cannot know about: archived rows never become READY
    app.execute("CREATE TRIGGER chunks_archived BEFORE UPDATE OF embedding_status ON chunks "
                "WHEN OLD.archived = 1 AND NEW.embedding_status = 'READY' "
                "BEGIN SELECT RAISE(ABORT, 'archived rows are read-only'); END")
    app.commit()
    app.close()
    [batch] = w.manager.flush_queue(force=True).submitted
    summary = w.manager.sync_status()
    assert summary.errors == [] and summary.applied == 2 and summary.failed == 1
    rows = {r["id"]: r for r in store_chunks(w.store)}
    assert [rows[i]["embedding_status"] for i in (1, 2, 3)] == ["READY", "FAILED", "READY"]
    assert rows[2]["error_message"] == "cannot store its vector: archived rows are read-only"
    assert store_vector(w.store, 2) is None and store_vector(w.store, 1) == fake_vector("kept", 16)
    assert w.store.batch(batch).status == "COMPLETED"
    assert w.manager.sync_status().errors == [] and w.manager.flush_queue().created == []
