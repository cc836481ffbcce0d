"""The contract every backend passes to be accepted (batchd.backends.Backend): each scenario written once and run
against every rig of tests/contract/conftest.py — the scripted file-backed backend, the local model, Vertex AI
through the real clients against the fakes, the Gemini API through google-genai against its fake. Assertions are on
SQLite rows and on the jobs the service holds."""

from __future__ import annotations

from typing import Any

import pytest
import structlog.testing

from batchd.backends import Stopped
from batchd.manager import BatchManager
from tests.contract.conftest import Rig

TEXTS = [f"contract sentence number {i}, about batch embedding." for i in range(10)] + \
        ["the same text twice", "the same text twice"]


def enqueue(r: Rig, texts: list[str] = TEXTS) -> None:
    r.manager.enqueue([(None, t) for t in texts])


def chunks(r: Rig) -> list[dict[str, Any]]:
    con = r.app()
    try:
        rows = con.execute("SELECT id, content, embedding_status, attempts, batch_job_id, error_message "
                           "FROM chunks ORDER BY id").fetchall()
    finally:
        con.close()
    return [dict(zip(("id", "text", "status", "attempts", "batch", "error"), row)) for row in rows]


def vectors(r: Rig) -> int:
    return r.store._conn.execute("SELECT count(*) FROM chunks_vec").fetchone()[0]


def assert_all_ready_once(r: Rig, n: int = len(TEXTS)) -> None:
    rows = chunks(r)
    assert [c["status"] for c in rows] == ["READY"] * n, rows
    assert vectors(r) == n
    dims = {len(r.store._conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (c["id"],))
                .fetchone()[0]) for c in rows}
    assert dims == {4 * r.expected_dimensions()}


def test_every_chunk_gets_its_vector_once_and_a_second_sync_changes_nothing(rig):
    enqueue(rig)
    assert rig.manager.flush_queue().created == [1]
    with structlog.testing.capture_logs() as logs:
        s = rig.manager.sync_status()
    assert s.finished == 1 and s.applied == len(TEXTS) and not s.errors
    assert_all_ready_once(rig)
    assert rig.store.batch(1).status == "COMPLETED"
    # The "-workers" rigs really went through the parse worker processes; the others never start one.
    assert any(e["event"] == "job.parse_workers" for e in logs) == rig.name.endswith("-workers")
    again = rig.manager.sync_status()
    assert (again.checked, again.applied) == (0, 0)


def test_a_lost_create_is_adopted_never_paid_twice(rig):
    enqueue(rig)
    rig.lose_next_create()
    rig.manager.flush_queue()
    rig.manager.flush_queue()  # recover() finds the job by its labels (Vertex adopts at once, inside submit)
    b = rig.store.batch(1)
    assert b.status == "RUNNING" and b.google_job_id
    assert rig.remote_jobs(1) == 1
    rig.manager.sync_status()
    assert_all_ready_once(rig)


def test_a_failed_recovery_lookup_keeps_the_batch_waiting_with_the_reason(rig):
    enqueue(rig)
    rig.fail_next_submit()
    rig.manager.flush_queue()
    b = rig.store.batch(1)
    assert b.status == "PENDING" and b.google_job_id is None and "submit failed, will retry" in b.error_message
    rig.fail_lookups(True)
    s = rig.manager.flush_queue()
    b = rig.store.batch(1)
    assert b.status == "PENDING" and b.error_message.startswith("recovery lookup failed, will retry: ")
    assert s.deferred == [1] and s.created == []
    assert {(c["status"], c["attempts"]) for c in chunks(rig)} == {("PENDING", 0)}  # no attempt burnt
    rig.fail_lookups(False)
    assert rig.manager.flush_queue().submitted == [1]
    assert rig.remote_jobs(1) == 1
    rig.manager.sync_status()
    assert_all_ready_once(rig)


def test_a_job_past_job_timeout_is_cancelled_and_its_chunks_retried(rig):
    enqueue(rig)
    rig.hold_jobs(True)
    rig.manager.flush_queue()
    rig.clock.advance(47 * 3600)
    assert rig.manager.sync_status().finished == 0
    rig.clock.advance(2 * 3600)
    s = rig.manager.sync_status()
    assert s.finished == 1 and s.errored == len(TEXTS)
    b = rig.store.batch(1)
    assert b.status == "FAILED" and b.error_message == "job timed out after 2d and was cancelled"
    assert {(c["status"], c["attempts"], c["batch"]) for c in chunks(rig)} == {("PENDING", 1, None)}
    rig.hold_jobs(False)
    rig.manager.flush_queue()
    rig.manager.sync_status()
    assert_all_ready_once(rig)


@pytest.mark.parametrize("state", ["FAILED", "CANCELLED", "EXPIRED"])
def test_a_job_that_ends_badly_sends_its_chunks_back_with_the_reason(rig, state):
    enqueue(rig)
    rig.end_jobs_as(state)
    rig.manager.flush_queue()
    s = rig.manager.sync_status()
    assert s.finished == 1 and s.applied == 0
    b = rig.store.batch(1)
    assert b.status == "FAILED" and b.error_message.startswith(f"job {state}")
    rows = chunks(rig)
    assert {(c["status"], c["attempts"], c["batch"]) for c in rows} == {("PENDING", 1, None)}
    assert all(c["error"].startswith(f"job {state}") for c in rows)
    rig.end_jobs_as(None)
    rig.manager.flush_queue()
    rig.manager.sync_status()
    assert_all_ready_once(rig)


def test_failed_lines_retry_only_their_chunks(rig):
    enqueue(rig)
    bad = {TEXTS[2], TEXTS[-1]}
    rig.fail_lines(bad)
    rig.manager.flush_queue()
    s = rig.manager.sync_status()
    assert s.finished == 1 and s.applied == len(TEXTS) - 3  # the duplicate shares its line
    assert rig.store.batch(1).status == "COMPLETED"
    for c in chunks(rig):
        if c["text"] in bad:
            assert (c["status"], c["attempts"], c["batch"]) == ("PENDING", 1, None) and c["error"]
        else:
            assert (c["status"], c["attempts"]) == ("READY", 0)
    rig.fail_lines(set())
    rig.manager.flush_queue()
    rig.manager.sync_status()
    assert_all_ready_once(rig)


def test_shutdown_mid_results_resumes_and_applies_each_vector_once(rig):
    enqueue(rig)
    rig.manager.flush_queue()
    calls = 0

    def progress() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Stopped()

    s = BatchManager(rig.store, rig.faults, rig.config, clock=rig.clock, progress=progress).sync_status()
    assert s.stopped and s.finished == 0
    assert rig.store.batch(1).status == "RUNNING"
    first = vectors(rig)
    s = rig.manager.sync_status()
    assert s.finished == 1 and s.applied + first == len(TEXTS)
    assert_all_ready_once(rig)
    assert rig.store.batch(1).completed_chunks == len(TEXTS)


def test_a_results_stream_that_breaks_midway_is_read_again_next_sync(rig):
    enqueue(rig)
    rig.manager.flush_queue()
    rig.break_results_after(4)
    s = rig.manager.sync_status()
    assert s.finished == 0 and s.applied == 0 and len(s.errors) == 1
    b = rig.store.batch(1)
    assert b.status == "RUNNING"
    assert b.error_message == "reading results failed, will retry: injected: connection reset while reading results"
    assert vectors(rig) == 0  # lines are spooled first: nothing half-applied
    rig.break_results_after(None)
    s = rig.manager.sync_status()
    assert s.finished == 1 and s.applied == len(TEXTS)
    assert_all_ready_once(rig)


def test_a_batch_found_empty_at_submit_is_closed_without_a_job(rig):
    enqueue(rig)
    claimed = rig.store.claim_batch(1000, rig.config.embedding.model, rig.clock())
    assert claimed is not None  # ... and then the process died before submitting; meanwhile the app:
    app = rig.app()
    app.execute("DELETE FROM chunks")
    app.commit()
    app.close()
    s = rig.manager.flush_queue()
    [n] = s.not_submitted
    assert (n.batch_id, n.status) == (1, "COMPLETED") and "deleted before submit" in n.reason
    assert rig.store.batch(1).status == "COMPLETED"
    assert rig.remote_jobs(1) == 0
