"""The two-phase apply (store/spool.py, ResultsMixin.apply_spool): data-safety rules, on real SQLite files.

The app's writes here go through its own connection (no sqlite-vec loaded) between two committed slices, by way
of the manager's progress callback, which apply_spool calls after every slice: a write the planner could not
have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchd.manager import BatchManager
from tests.fakes.membackend import fake_vector
from tests.storehelp import store_chunk, store_chunks, store_vector


def spools(w: Any) -> list[Path]:
    db = Path(w.config.database.path)
    return list(db.parent.glob(db.name + "-batchd-spool-*"))


def test_applied_in_id_order_across_slices_even_when_the_output_is_shuffled(world):
    w = world(queue={"max_batch_size": 5000})
    w.knobs(shuffle=True)
    texts = [f"row {i}" for i in range(3000)]
    w.manager.enqueue([(None, t) for t in texts])
    w.manager.flush_queue(force=True)
    seen: list[list[int]] = []

    def progress() -> None:  # after each committed slice: the READY ids are always a prefix in id order
        ready = [c["id"] for c in store_chunks(w.store) if c["embedding_status"] == "READY"]
        assert ready == list(range(1, len(ready) + 1))
        seen.append(ready)

    s = BatchManager(w.store, w.backend, w.config, clock=w.clock, progress=progress).sync_status()
    assert s.applied == 3000 and s.finished == 1
    assert len({len(r) for r in seen if 0 < len(r) < 3000}) >= 1  # several slices, not one transaction
    for c in store_chunks(w.store):
        assert c["embedding_status"] == "READY"
        assert store_vector(w.store, c["id"]) == fake_vector(c["text"], w.config.embedding.dimensions)
    assert spools(w) == []


def test_a_text_changed_or_a_row_deleted_after_planning_is_never_written(world):
    w = world(queue={"max_batch_size": 5000})
    texts = [f"row {i}" for i in range(3000)]
    w.manager.enqueue([(None, t) for t in texts])
    w.manager.flush_queue(force=True)
    app = w.app_connect()
    done = False

    def progress() -> None:
        nonlocal done
        if not done and w.store.vector_count() > 0:  # after the first committed slice of the apply phase
            done = True
            app.execute("UPDATE chunks SET content = 'rewritten while in flight' WHERE id = 3000")
            app.execute("DELETE FROM chunks WHERE id = 2999")
            app.commit()

    s = BatchManager(w.store, w.backend, w.config, clock=w.clock, progress=progress).sync_status()
    assert done and s.applied == 2998
    changed = store_chunk(w.store, 3000)
    assert changed["embedding_status"] == "PENDING" and changed["batch_job_id"] is None
    assert store_vector(w.store, 3000) is None and store_vector(w.store, 2999) is None
    assert store_chunk(w.store, 2999) is None
    # The next cycle embeds the new text; nothing stale ever lands.
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    assert store_vector(w.store, 3000) == fake_vector("rewritten while in flight", w.config.embedding.dimensions)
    assert store_vector(w.store, 2999) is None


def test_applying_a_finished_job_again_changes_nothing(world):
    w = world()
    w.knobs(shuffle=True, fail_every=7)
    w.manager.enqueue([(None, f"row {i}") for i in range(500)])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    before = [(c["id"], c["embedding_status"], c["attempts"], store_vector(w.store, c["id"])) for c in store_chunks(w.store)]
    # A crash after the last slice but before the batch was closed: the batch is RUNNING again and the whole
    # output is read and applied a second time.
    job = w.store.batch(1).google_job_id
    w.store.mark_submitted(1, job, w.clock())
    with w.store.transaction() as c:
        c.execute("UPDATE batch_jobs SET status = 'RUNNING', finished_at = NULL WHERE id = 1")
    s = w.manager.sync_status()
    assert s.applied == 0
    after = [(c["id"], c["embedding_status"], c["attempts"], store_vector(w.store, c["id"])) for c in store_chunks(w.store)]
    assert after == before


def test_an_orphaned_spool_is_wiped_at_the_next_sync(world):
    w = world()
    w.manager.enqueue([(None, "a")])
    orphan = Path(w.config.database.path + "-batchd-spool-77")
    orphan.write_bytes(b"left by a killed sync")
    w.manager.sync_status()
    assert not orphan.exists()


def test_error_lines_of_the_spool_go_through_the_retry_path(world):
    w = world(queue={"max_attempts": 2})
    w.knobs(fail_texts=["bad"])
    w.manager.enqueue([(None, "good 1"), (None, "bad 1"), (None, "good 2")])
    w.manager.flush_queue(force=True)
    s = w.manager.sync_status()
    assert s.applied == 2 and s.errored == 1
    bad = [c for c in store_chunks(w.store) if c["text"] == "bad 1"][0]
    assert bad["embedding_status"] == "PENDING" and bad["attempts"] == 1
    assert "simulated line failure" in bad["error_message"]



def test_stopped_in_the_apply_phase_keeps_whole_slices_and_the_next_sync_applies_the_rest(world):
    """Issue 15: a stop (SIGTERM) between two slices of the apply phase: the slices committed stay, none is
    half-written, the spool file is gone, and the next sync applies the rest, each vector once."""
    from batchd.backends import Stopped

    w = world(queue={"max_batch_size": 5000})
    w.knobs(shuffle=True)
    texts = [f"row {i}" for i in range(3000)]
    w.manager.enqueue([(None, t) for t in texts])
    w.manager.flush_queue(force=True)

    def progress() -> None:  # the first call that sees a READY chunk comes right after the first applied slice
        if any(c["embedding_status"] == "READY" for c in store_chunks(w.store)):
            raise Stopped()

    s = BatchManager(w.store, w.backend, w.config, clock=w.clock, progress=progress).sync_status()
    assert s.stopped
    ready = [c for c in store_chunks(w.store) if c["embedding_status"] == "READY"]
    assert 0 < len(ready) < 3000 and [c["id"] for c in ready] == list(range(1, len(ready) + 1))
    for c in ready:
        assert store_vector(w.store, c["id"]) == fake_vector(c["text"], w.config.embedding.dimensions)
    assert w.store.batch(1).status == "RUNNING" and spools(w) == []
    s = w.manager.sync_status()
    assert s.finished == 1 and s.applied == 3000 - len(ready)
    assert all(c["embedding_status"] == "READY" for c in store_chunks(w.store))
    assert w.store._conn.execute("SELECT count(*) FROM chunks_vec").fetchone()[0] == 3000


def test_marking_ready_goes_by_id_even_when_analyze_saw_the_batch_index_empty(world):
    """The quadratic plan found by the 1M-row benchmark: with statistics gathered while nothing was in flight
    (``sqlite_stat1`` says the batch's partial index is empty), SQLite walked that index — every chunk in flight
    — once per slice. The statement that marks chunks READY must look them up by id, whatever the statistics."""
    w = world(queue={"max_batch_size": 5000})
    w.manager.enqueue([(None, f"row {i}") for i in range(1500)])
    w.store._conn.execute("ANALYZE")  # nothing in flight yet: the partial batch index is empty
    assert w.store._conn.execute("SELECT stat FROM sqlite_stat1 WHERE idx LIKE '%batch'").fetchone()[0].startswith("0")
    w.manager.flush_queue(force=True)
    marks: list[str] = []
    plans: list[str] = []
    w.store._conn.set_trace_callback(
        lambda sql: marks.append(sql) if sql.startswith("UPDATE") and "'READY'" in sql else None)

    def progress() -> None:  # after a slice, the spool still attached: how would SQLite run that statement?
        if marks and not plans:
            w.store._conn.set_trace_callback(None)
            plans.extend(r[3] for r in w.store._conn.execute("EXPLAIN QUERY PLAN " + marks[-1]))

    try:
        s = BatchManager(w.store, w.backend, w.config, clock=w.clock, progress=progress).sync_status()
    finally:
        w.store._conn.set_trace_callback(None)
    assert s.applied == 1500 and plans, marks
    chunks_step = [p for p in plans if " chunks " in f" {p} "]
    assert chunks_step and all("INTEGER PRIMARY KEY" in p for p in chunks_step), plans
    assert not any("batchd_chunks" in p for p in plans), plans
