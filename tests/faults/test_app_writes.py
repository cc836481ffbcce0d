"""batchd never breaks the application's writes (issue 9, item 1) — a suite any future trigger change must pass.

The application is a separate process using the standard library's sqlite3 without sqlite-vec
(tests/faults/appwriter.py). It runs every common write pattern while batchd is stopped (everything READY) and
while batches are in flight (claimed and submitted, results not yet applied). Every statement must succeed; the
rows the app did not really change must not be re-queued; and once batchd has run to idle, every chunk is
READY with the vector of its current text and no deleted id has a vector.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.faults import appwriter
from tests.faults.invariants import problems
from tests.storehelp import store_chunk, store_chunks, store_vector

APPWRITER = str(Path(appwriter.__file__))


def run_app(db: Path, *patterns: str, sleep: float = 0.0) -> list[dict[str, Any]]:
    cmd = [sys.executable, APPWRITER, str(db), *patterns]
    if sleep:
        cmd += ["--sleep", str(sleep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert results, proc.stderr
    return results


def drive_to_idle(w: Any, rounds: int = 20) -> None:
    for _ in range(rounds):
        w.manager.flush_queue(force=True)
        w.manager.sync_status()
        st = w.manager.get_queue_stats()
        if st["pending"] == 0 and st["running"] == 0:
            return
    raise AssertionError(f"queue not idle after {rounds} rounds: {w.manager.get_queue_stats()}")


@pytest.fixture
def app_world(world: Any, tmp_path: Path) -> Any:
    appwriter.create_app_table(str(tmp_path / "app.db"))
    return world(queue={"max_batch_size": 500, "max_running_jobs": 10})


@pytest.mark.parametrize("phase", ["stopped", "in_flight"])
def test_every_app_write_pattern_succeeds_and_ends_with_current_vectors(app_world: Any, phase: str) -> None:
    w = app_world
    db = Path(w.config.database.path)
    drive_to_idle(w)
    before = {c["id"]: c for c in store_chunks(w.store)}
    embedded_at = {i: store_chunk(w.store, i)["embedded_at"] for i in appwriter.UNCHANGED}
    if phase == "in_flight":
        # Everything claimed and submitted again (new texts), results not applied yet when the app writes.
        w.app_connect().close()
        conn = w.app_connect()
        conn.execute("UPDATE chunks SET content = content || ' (in flight)'")
        conn.commit()
        conn.close()
        w.manager.flush_queue(force=True)
        assert w.manager.get_queue_stats()["running"] == len(before)
        embedded_at = None

    results = run_app(db)
    failed = [r for r in results if not r["ok"]]
    assert failed == [], failed

    if embedded_at is not None:
        for i in appwriter.UNCHANGED:
            c = store_chunk(w.store, i)
            assert c["embedding_status"] == "READY" and c["embedded_at"] == embedded_at[i], \
                f"chunk {i} was re-queued although the app did not change its text"
    drive_to_idle(w)
    assert problems(w.store, w.dir, texts_once=False) == []
    for i in appwriter.DELETED:
        assert store_chunk(w.store, i) is None and store_vector(w.store, i) is None
    assert store_chunk(w.store, 111)["text"] == "three (final for 111)"
    assert store_chunk(w.store, 112)["text"] == "tres (final for 112)"


def test_a_long_app_transaction_while_batchd_flushes_and_syncs(app_world: Any) -> None:
    """The app holds the write lock for 2 s while batchd works: both sides succeed; nothing stale remains."""
    w = app_world
    db = Path(w.config.database.path)
    w.manager.flush_queue(force=True)
    results: list[Any] = []
    app = threading.Thread(target=lambda: results.extend(run_app(db, "long_transaction", sleep=2.0)))
    app.start()
    w.manager.sync_status()
    w.manager.flush_queue(force=True)
    app.join(60)
    assert [r for r in results if not r["ok"]] == [] and results
    drive_to_idle(w)
    assert problems(w.store, w.dir, texts_once=False) == []
    assert store_chunk(w.store, 2100)["text"] == "long transaction re-inserted 2100"


def test_enqueue_of_one_id_retexted_three_times_in_one_input(tmp_path: Path, batchd_env: dict[str, str]) -> None:
    """`batchd enqueue` with one id re-texted 3 times: every line lands, the last text wins (was: exit 1, 0 rows)."""
    from tests.conftest import MEMBACKEND, batchd_cmd

    cfg = tmp_path / "batchd.toml"
    cfg.write_text(f'[database]\npath = "{tmp_path / "app.db"}"\n[embedding]\nbackend = "{MEMBACKEND}"\n'
                   'model = "test-model"\ndimensions = 16\n')
    lines = '{"text":"good"}\n{"id":7,"text":"a"}\n{"id":7,"text":"b"}\n{"id":7,"text":"c"}\n'
    proc = subprocess.run([*batchd_cmd(), "--config", str(cfg), "enqueue", "-"], input=lines, text=True,
                          capture_output=True, env=batchd_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    conn = __import__("sqlite3").connect(tmp_path / "app.db")
    rows = conn.execute("SELECT id, content FROM chunks ORDER BY id").fetchall()
    conn.close()
    assert sorted(r[1] for r in rows) == ["c", "good"]
    assert (7, "c") in rows
