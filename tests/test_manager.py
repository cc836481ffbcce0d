"""The manager's state machine against the file-backed test backend: every rule in DESIGN.md, on real SQLite.

Failure scenarios every backend must survive (lost create, timeout, bad final states, failed lines, shutdown,
broken result streams, failed lookups, empty batches) are written once in tests/contract/."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes.membackend import fake_vector, jobs_for_batch, read_counters
from tests.storehelp import store_chunks, store_vector


def enqueue(w: Any, texts: list[str]) -> None:
    w.manager.enqueue([(None, t) for t in texts])


def snapshot(w: Any) -> tuple:
    chunks = store_chunks(w.store)
    vectors = {c["id"]: store_vector(w.store, c["id"]) for c in chunks}
    batches = [(b.id, b.status, b.google_job_id, b.completed_chunks, b.failed_chunks, b.error_message)
               for b in w.store.batches()]
    return chunks, vectors, batches


def assert_invariants(w: Any) -> None:
    """Every chunk is READY with a vector of the right size, PENDING not in flight, running in a RUNNING/PENDING
    batch, or FAILED with a reason; no batch RUNNING after its job ended; one remote job per batch."""
    dims = w.config.embedding.dimensions
    active = {b.id for b in w.store.batches(["PENDING", "RUNNING"])}
    for c in store_chunks(w.store):
        st = c["embedding_status"]
        if st == "READY":
            vec = store_vector(w.store, c["id"])
            assert vec is not None and len(vec) == 4 * dims, c
            assert c["batch_job_id"] is None
        elif st == "FAILED":
            assert c["error_message"], c
            assert c["batch_job_id"] is None
        else:
            assert st == "PENDING", c
            assert c["batch_job_id"] is None or c["batch_job_id"] in active, c
    for b in w.store.batches():
        if b.remote_state in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PARTIALLY_SUCCEEDED"):
            assert b.status in ("COMPLETED", "FAILED"), b
        assert len(jobs_for_batch(w.dir, b.id)) <= 1, f"batch {b.id} has more than one remote job"


def flush_sync(w: Any) -> None:
    w.manager.flush_queue(force=True)
    w.manager.sync_status()


def test_happy_path_out_of_order_every_chunk_ready_with_its_vector(world):
    w = world()
    w.knobs(shuffle=True)
    texts = [f"sentence number {i}" for i in range(300)]
    enqueue(w, texts)
    ids = w.manager.flush_queue().created
    assert ids == [1]
    s = w.manager.sync_status()
    assert s.applied == 300 and s.finished == 1
    for c in store_chunks(w.store):
        assert c["embedding_status"] == "READY"
        assert store_vector(w.store, c["id"]) == fake_vector(c["text"], 16)
    assert_invariants(w)
    before = snapshot(w)
    again = w.manager.sync_status()
    assert again.applied == 0 and again.checked == 0
    assert snapshot(w) == before
    assert w.manager.get_queue_stats() == {"pending": 0, "running": 0, "ready": 300, "failed": 0, "truncated": 0,
                                           "batches": {"PENDING": 0, "RUNNING": 0, "COMPLETED": 1, "FAILED": 0}}


def test_dropped_and_failed_lines_retry_only_their_chunks_then_fail_at_max_attempts(world):
    w = world(queue={"max_attempts": 2})
    texts = [f"text {i:03d}." for i in range(70)]
    dropped = {f"text {i:03d}." for i in range(70) if i % 7 == 0}
    failed = {f"text {i:03d}." for i in range(70) if i % 5 == 0 and i % 7 != 0}
    w.knobs(drop_texts=sorted(dropped), fail_texts=sorted(failed), shuffle=True)
    enqueue(w, texts)
    flush_sync(w)
    chunks = {c["text"]: c for c in store_chunks(w.store)}
    for text, c in chunks.items():
        if text in dropped:
            assert (c["embedding_status"], c["attempts"], c["batch_job_id"]) == ("PENDING", 1, None)
            assert c["error_message"] == "missing from the job's output"
        elif text in failed:
            assert (c["embedding_status"], c["attempts"]) == ("PENDING", 1)
            assert "simulated line failure" in c["error_message"]
        else:
            assert c["embedding_status"] == "READY" and c["attempts"] == 0
    b = w.store.batch(1)
    assert (b.status, b.completed_chunks, b.failed_chunks) == ("COMPLETED", 70 - len(dropped) - len(failed),
                                                              len(dropped) + len(failed))
    assert_invariants(w)
    before = snapshot(w)
    w.manager.sync_status()
    assert snapshot(w) == before

    # Second round: the same items fail again -> max_attempts (2) reached -> FAILED with the reason.
    w.knobs(fail_every=1)
    flush_sync(w)
    st = w.manager.get_queue_stats()
    assert st["failed"] == len(dropped) + len(failed) and st["pending"] == 0
    for c in store_chunks(w.store):
        if c["embedding_status"] == "FAILED":
            assert c["attempts"] == 2 and "simulated line failure" in c["error_message"]
    assert_invariants(w)

    # retry --failed puts them back with attempts reset; a healthy backend then finishes the queue.
    w.knobs()
    assert w.manager.retry_failed() == st["failed"]
    flush_sync(w)
    assert w.manager.get_queue_stats()["ready"] == 70
    assert_invariants(w)


def test_partially_succeeded_job_applies_what_it_has(world):
    w = world()
    w.knobs(final_state="PARTIALLY_SUCCEEDED", fail_every=4)
    enqueue(w, [f"t{i}" for i in range(20)])
    flush_sync(w)
    st = w.manager.get_queue_stats()
    assert st["ready"] == 15 and st["pending"] == 5
    assert w.store.batch(1).status == "COMPLETED"
    assert_invariants(w)


def test_permanent_submit_failure_is_recorded_on_batch_and_chunks(world):
    w = world()
    w.knobs(submit_permanent="400 model publishers/google/models/nope not found")
    enqueue(w, [f"t{i}" for i in range(5)])
    w.manager.flush_queue(force=True)
    b = w.store.batch(1)
    assert b.status == "FAILED" and "400 model" in b.error_message
    for c in store_chunks(w.store):
        assert c["embedding_status"] == "PENDING" and c["attempts"] == 1
        assert "submit rejected: 400 model" in c["error_message"]
    assert_invariants(w)


def test_stale_results_are_dropped_text_change_and_delete(world, tmp_path):
    w = world()
    enqueue(w, ["alpha", "beta", "gamma", "delta"])
    w.manager.flush_queue(force=True)
    # The application, on its own connection WITHOUT sqlite-vec, edits while in flight.
    app = w.app_connect()
    app.execute("UPDATE chunks SET content = 'beta, rewritten' WHERE content = 'beta'")
    app.execute("DELETE FROM chunks WHERE content = 'gamma'")
    app.commit()
    w.manager.sync_status()
    chunks = {c["text"]: c for c in store_chunks(w.store)}
    assert set(chunks) == {"alpha", "beta, rewritten", "delta"}
    assert chunks["alpha"]["embedding_status"] == "READY"
    c = chunks["beta, rewritten"]
    assert (c["embedding_status"], c["attempts"], c["batch_job_id"]) == ("PENDING", 0, None)
    assert store_vector(w.store, c["id"]) is None  # the stale "beta" vector was never applied
    assert w.store.vector_count() == 2
    flush_sync(w)
    assert store_vector(w.store, c["id"]) == fake_vector("beta, rewritten", 16)

    # A READY chunk rewritten by the app: back to PENDING, old vector removed at batchd's next cycle.
    alpha = chunks["alpha"]["id"]
    app.execute("UPDATE chunks SET content = 'alpha two' WHERE id = ?", (alpha,))
    app.execute("DELETE FROM chunks WHERE content = 'delta'")
    app.commit()
    w.manager.sync_status()  # purges tombstones first
    assert store_vector(w.store, alpha) is None
    assert w.store.vector_count() == 1
    flush_sync(w)
    assert store_vector(w.store, alpha) == fake_vector("alpha two", 16)
    app.close()
    assert_invariants(w)


def test_identical_texts_are_sent_once_and_known_texts_copied_locally(world):
    w = world()
    enqueue(w, ["same text"] * 5 + ["other"] * 3 + ["unique"])
    flush_sync(w)
    assert read_counters(w.dir)["lines_sent"] == 3
    assert w.manager.get_queue_stats()["ready"] == 9
    enqueue(w, ["same text", "other", "brand new"])
    flush_sync(w)
    assert read_counters(w.dir)["lines_sent"] == 4  # only "brand new" was paid for
    ready = [c for c in store_chunks(w.store) if c["text"] == "same text"]
    assert len(ready) == 6 and all(store_vector(w.store, c["id"]) == fake_vector("same text", 16) for c in ready)
    assert_invariants(w)


def test_texts_in_flight_elsewhere_wait_for_that_job(world):
    w = world()
    enqueue(w, ["shared"] * 2)
    w.manager.flush_queue(force=True)
    enqueue(w, ["shared", "fresh"])
    w.manager.flush_queue(force=True)  # "shared" is in flight in batch 1: only "fresh" is sent
    assert read_counters(w.dir)["lines_sent"] == 2
    w.manager.sync_status()
    w.manager.flush_queue(force=True)  # now copied locally
    assert read_counters(w.dir)["lines_sent"] == 2
    assert w.manager.get_queue_stats()["ready"] == 4
    assert_invariants(w)


def test_chunks_without_text_fail_at_once_and_are_never_sent(world):
    w = world()
    app = w.app_connect()
    app.executemany("INSERT INTO chunks(content) VALUES (?)", [("",), ("   ",), ("real text",)])
    app.commit()
    app.close()
    flush_sync(w)
    by_text = {c["text"]: c for c in store_chunks(w.store)}
    assert by_text[""]["embedding_status"] == "FAILED"
    assert by_text[""]["error_message"] == "empty text: nothing to embed"
    assert by_text["   "]["embedding_status"] == "FAILED"
    assert by_text["real text"]["embedding_status"] == "READY"
    assert read_counters(w.dir)["lines_sent"] == 1


def test_thresholds_split_and_max_running_jobs(world):
    w = world(queue={"min_batch_size": 20, "max_batch_size": 20, "max_wait": "10m", "max_running_jobs": 2})
    enqueue(w, [f"t{i}" for i in range(15)])
    assert w.manager.flush_queue().created == []  # 15 < 20 and nothing is old yet
    w.clock.advance(601)  # the oldest pending chunk is now older than max_wait
    assert w.manager.flush_queue().created == [1]
    enqueue(w, [f"u{i}" for i in range(100)])
    assert w.manager.flush_queue().created == [2]  # the second slot; 80 stay pending
    assert w.manager.flush_queue().created == []  # two jobs in flight already
    w.manager.sync_status()
    assert w.manager.flush_queue().created == [3, 4]
    assert [b.total_chunks for b in w.store.batches()] == [15, 20, 20, 20]
    while w.manager.get_queue_stats()["pending"] or w.manager.get_queue_stats()["running"]:
        w.manager.sync_status()
        w.manager.flush_queue()
    assert w.manager.get_queue_stats()["ready"] == 115
    assert all(b.total_chunks <= 20 for b in w.store.batches())
    assert_invariants(w)


def test_status_errors_are_retried_next_sync(world):
    w = world()
    w.knobs(status_errors=1)
    enqueue(w, ["x", "y"])
    w.manager.flush_queue(force=True)
    s = w.manager.sync_status()
    assert s.errors and s.applied == 0
    assert "status check failed" in w.store.batch(1).error_message
    s = w.manager.sync_status()
    assert s.applied == 2 and not s.errors


def test_cancel_returns_chunks_without_counting_an_attempt(world):
    w = world()
    w.knobs(never_finish=True)
    enqueue(w, ["x", "y"])
    w.manager.flush_queue(force=True)
    assert w.manager.cancel(1) is True
    assert w.manager.cancel(1) is False
    assert w.store.batch(1).status == "FAILED"
    for c in store_chunks(w.store):
        assert (c["embedding_status"], c["attempts"], c["batch_job_id"]) == ("PENDING", 0, None)
    assert read_counters(w.dir)["cancels"] == 1


def test_a_job_the_service_no_longer_knows_fails_its_batch_at_once(world):
    w = world()
    w.knobs(never_finish=True)
    enqueue(w, ["x", "y"])
    w.manager.flush_queue(force=True)
    for f in w.dir.glob("job-1-*.json"):
        f.unlink()  # deleted on the service's side
    s = w.manager.sync_status()
    assert s.finished == 1
    b = w.store.batch(1)
    assert b.status == "FAILED" and b.error_message.startswith("remote job lost: no such job")
    for c in store_chunks(w.store):
        assert (c["embedding_status"], c["attempts"], c["batch_job_id"]) == ("PENDING", 1, None)
    assert_invariants(w)
