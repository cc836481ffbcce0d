"""Failure paths particular to the Vertex backend, through BatchManager and the real clients against the fakes:
lost creates (503 or a reset connection), 429/503 storms, permanent errors, bad lines, credentials, the bucket.
The scenarios every backend shares (bad final states, timeouts, ...) run in tests/contract/ against Vertex too."""

from __future__ import annotations

import pytest

from batchd.backends import CheckResult
from batchd.backends.vertex import SetupError
from tests.fakes.fake_vertex import fake_vector
from tests.fakes.vertex_env import fake_vertex, gcs, vworld
from tests.storehelp import store_chunks, store_vector

DIMS = 8


def texts(n: int = 30) -> list[str]:
    return [f"document {i}" for i in range(n)]


def enqueue(w, n: int = 30) -> list[str]:
    t = texts(n)
    w.manager.enqueue([(None, x) for x in t])
    return t


def assert_all_ready(w, t: list[str]) -> None:
    rows = store_chunks(w.store)
    assert [r["embedding_status"] for r in rows] == ["READY"] * len(t)
    for r, text in zip(rows, t):
        assert store_vector(w.store, r["id"]) == fake_vector(text, DIMS)


def finish_and_assert_all_ready(w, t: list[str]) -> None:
    """The fake's jobs end; one sync applies them: every text READY with its own vector."""
    w.fake.finish()
    w.manager.sync_status()
    assert_all_ready(w, t)


def assert_one_job_recorded(w, batch_id: int = 1) -> None:
    """Exactly one remote job was ever created, and the batch records its name."""
    assert w.fake.count("create") == 1 and len(w.fake.job_names()) == 1
    assert w.store.batch(batch_id).google_job_id == w.fake.job_names()[0]


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_lost_create_is_adopted(vworld, mode: str) -> None:
    w = vworld()
    t = enqueue(w)
    w.fake.lose_create, w.fake.lose_create_mode = 1, mode
    assert w.manager.flush_queue().created == [1]
    assert_one_job_recorded(w)
    assert w.store.batch(1).status == "RUNNING"
    finish_and_assert_all_ready(w, t)


def test_lost_create_adopted_by_the_next_flush(vworld) -> None:
    """The create's answer is lost and the lookup fails too: the batch waits; the next flush adopts."""
    w = vworld()
    t = enqueue(w)
    w.fake.lose_create = 1
    w.fake.fail_next(503, times=10_000, op="list")
    assert w.manager.flush_queue().created == [1]
    b = w.store.batch(1)
    assert b.status == "PENDING" and b.google_job_id is None
    assert "submit failed, will retry" in b.error_message
    assert len(w.fake.job_names()) == 1
    w.fake.clear_faults()
    assert w.manager.flush_queue().created == []  # recover() adopts; nothing new to claim
    assert_one_job_recorded(w)
    finish_and_assert_all_ready(w, t)


def test_crash_between_create_and_commit_is_adopted(vworld) -> None:
    """The job was created but batchd died before recording its name: recover() finds it by its labels."""
    w = vworld()
    t = enqueue(w)
    batch_id, n = w.store.claim_batch(1000, w.config.embedding.model, w.clock())
    w.backend.submit(batch_id, w.store.batch_items(batch_id))  # ... and then the process died
    assert w.store.batch(batch_id).google_job_id is None
    assert w.manager.recover() == 1
    assert_one_job_recorded(w, batch_id)
    finish_and_assert_all_ready(w, t)


def test_storms_of_429_and_503_are_ridden_out(vworld) -> None:
    w = vworld()
    t = enqueue(w)
    w.fake.fail_next(429, times=4, op="create")
    w.fake.fail_next(503, times=3, op="list")
    w.fake.fail_next(429, times=2)
    assert w.manager.flush_queue().created == [1]
    assert len(w.fake.job_names()) == 1 and w.store.batch(1).status == "RUNNING"
    w.fake.fail_next(503, times=5, op="get")
    w.fake.fail_next(429, times=3, op="get")
    w.fake.finish()
    s = w.manager.sync_status()
    assert s.errors == [] and s.applied == 30
    assert_all_ready(w, t)


def test_503_on_create_never_makes_two_jobs(vworld) -> None:
    """A 503 on create is ambiguous: the job is looked up, not created again; the next flush submits."""
    w = vworld()
    t = enqueue(w)
    w.fake.fail_next(503, times=1, op="create")
    w.manager.flush_queue()
    assert w.store.batch(1).status == "PENDING" and w.fake.job_names() == []
    w.manager.flush_queue()
    assert len(w.fake.job_names()) == 1 and w.store.batch(1).status == "RUNNING"
    finish_and_assert_all_ready(w, t)


def test_storm_longer_than_the_deadline_is_retried_next_cycle(vworld) -> None:
    w = vworld(vertex={"retry_deadline": "200ms", "retry_backoff": "50ms"})
    t = enqueue(w)
    w.manager.flush_queue()
    w.fake.finish()
    w.fake.fail_next(503, times=10_000, op="get")
    s = w.manager.sync_status()
    assert s.finished == 0 and len(s.errors) == 1
    assert "status check failed, will retry" in w.store.batch(1).error_message
    w.fake.clear_faults()
    w.manager.sync_status()
    assert_all_ready(w, t)


def test_permanent_error_on_create_fails_the_batch_with_the_message(vworld) -> None:
    w = vworld()
    enqueue(w)
    w.fake.fail_next(400, op="create", message="fake: model publishers/google/models/x is not allowed")
    w.manager.flush_queue()
    b = w.store.batch(1)
    assert b.status == "FAILED"
    assert "fake: model publishers/google/models/x is not allowed" in b.error_message
    for r in store_chunks(w.store):
        assert (r["embedding_status"], r["attempts"]) == ("PENDING", 1)
        assert "fake: model publishers/google/models/x is not allowed" in r["error_message"]
    assert w.fake.job_names() == []


def test_garbage_output_is_logged_twenty_times_then_once_and_counted_in_full(vworld) -> None:
    """The same cap when VertexBackend parses in this process (a batch too small for the parse workers)."""
    import structlog.testing

    from batchd.logs import MALFORMED_LOGGED

    w = vworld()
    enqueue(w, 5)
    w.manager.flush_queue()
    w.fake.malformed = 60
    w.fake.finish()
    with structlog.testing.capture_logs() as logs:
        s = w.manager.sync_status()
    assert s.applied == 5
    said = [e["event"] for e in logs if e["event"].startswith("job.output_malformed")]
    assert said == ["job.output_malformed"] * MALFORMED_LOGGED + ["job.output_malformed_more"]
    assert w.store.batch(1).unmatched_lines == 60


def test_short_vector_is_a_line_error(vworld) -> None:
    w = vworld()
    enqueue(w, 5)
    w.manager.flush_queue()
    w.fake.output_dims = DIMS - 1
    w.fake.finish()
    w.manager.sync_status()
    for r in store_chunks(w.store):
        assert (r["embedding_status"], r["attempts"]) == ("PENDING", 1)
        assert r["error_message"] == f"vector has {DIMS - 1} dimensions, expected {DIMS}"


def test_retried_submit_keeps_the_staged_input(vworld) -> None:
    """A resubmit after a failed create finds input.jsonl already there (ifGenerationMatch=0): no error."""
    w = vworld()
    enqueue(w, 5)
    w.fake.fail_next(503, op="create")
    w.manager.flush_queue()
    first = w.staged(1)
    w.manager.flush_queue()
    assert w.staged(1) == first and w.store.batch(1).status == "RUNNING"


def test_check_reports_each_part(vworld, tmp_path) -> None:
    w = vworld()
    results = w.backend.check()
    assert all(isinstance(r, CheckResult) for r in results)
    assert [(r.name, r.ok) for r in results] == [
        ("vertex settings", True), ("credentials", True), ("bucket gs://batchd-test", True),
        ("vertex job service", True)]

    w2 = vworld(vertex={"staging_uri": "gs://no-such-bucket-here/x", "api_endpoint": "http://127.0.0.1:9"})
    by_name = {r.name: r for r in w2.backend.check()}
    assert not by_name["bucket gs://no-such-bucket-here"].ok
    assert not by_name["vertex job service"].ok
    assert by_name["vertex job service"].detail.startswith("listing batch prediction jobs in projects/proj/")

    w3 = vworld(vertex={"project": ""})
    [only] = w3.backend.check()
    assert not only.ok and "vertex.project is not set" in only.detail

    w4 = vworld(vertex={"credentials": str(tmp_path / "missing.json")})
    by_name = {r.name: r for r in w4.backend.check()}
    assert not by_name["credentials"].ok and "missing.json does not exist" in by_name["credentials"].detail
    with pytest.raises(SetupError, match="missing.json does not exist"):
        w4.backend.find_job(1)


def test_bad_credentials_keep_batches_waiting_without_burning_attempts(vworld, tmp_path) -> None:
    w = vworld(vertex={"credentials": str(tmp_path / "missing.json")})
    enqueue(w, 3)
    w.manager.flush_queue()
    b = w.store.batch(1)
    assert b.status == "PENDING" and "missing.json does not exist" in b.error_message
    assert {(r["embedding_status"], r["attempts"]) for r in store_chunks(w.store)} == {("PENDING", 0)}


@pytest.mark.parametrize("model", ["text-embedding-005", "gemini-embedding-001"])
def test_embed_query_online(vworld, model: str) -> None:
    w = vworld(embedding={"model": model})
    # Gemini queries are renormalised like Gemini documents (issue 10.1); classic ones kept as answered.
    assert w.backend.embed_query("where is the manual?") == \
        fake_vector("where is the manual?", DIMS, unit=model.startswith("gemini"))
    assert w.fake.count("predict") == 1


def test_shutdown_mid_results_stops_at_a_slice_and_resumes(vworld) -> None:
    """Stopped while applying (after the first committed slice) propagates; the next sync applies the rest once."""
    from batchd.backends import Stopped
    from batchd.manager import BatchManager

    w = vworld(queue={"max_batch_size": 5000})
    t = enqueue(w, 5000)
    w.manager.flush_queue()
    w.fake.finish()

    def progress() -> None:
        if w.store.vector_count() > 0:  # the first id-ordered slice has committed
            raise Stopped()

    stopping = BatchManager(w.store, w.backend, w.config, clock=w.clock, progress=progress)
    s = stopping.sync_status()
    assert s.stopped and 0 < s.applied < 5000
    first = s.applied
    assert w.store.batch(1).status == "RUNNING" and w.store.vector_count() == first
    ids = [c["id"] for c in store_chunks(w.store) if c["embedding_status"] == "READY"]
    assert ids == sorted(c["id"] for c in store_chunks(w.store))[:first]  # applied in chunk-id order
    s = w.manager.sync_status()
    assert s.finished == 1 and s.applied == 5000 - first
    assert_all_ready(w, t)
    assert w.store.batch(1).completed_chunks == 5000


def test_shutdown_while_spooling_applies_nothing_and_leaves_no_spool(vworld) -> None:
    """Stopped while the output is still being read: nothing half-applied, the spool file is gone."""
    from pathlib import Path

    from batchd.backends import Stopped
    from batchd.manager import BatchManager

    w = vworld(queue={"max_batch_size": 5000})
    t = enqueue(w, 5000)
    w.manager.flush_queue()
    w.fake.finish()
    calls = 0

    def progress() -> None:
        nonlocal calls
        calls += 1
        if calls == 4:  # results() reports every 500 lines: well inside the read of 5,000
            raise Stopped()

    s = BatchManager(w.store, w.backend, w.config, clock=w.clock, progress=progress).sync_status()
    assert s.stopped and s.applied == 0 and w.store.vector_count() == 0
    db = Path(w.config.database.path)
    assert not list(db.parent.glob(db.name + "-batchd-spool-*"))
    s = w.manager.sync_status()
    assert s.finished == 1 and s.applied == 5000
    assert_all_ready(w, t)


def test_missing_bucket_fails_the_submit_permanently(vworld) -> None:
    w = vworld(vertex={"staging_uri": "gs://no-such-bucket-here/x"})
    enqueue(w, 3)
    w.manager.flush_queue()
    b = w.store.batch(1)
    assert b.status == "FAILED" and "cannot write gs://no-such-bucket-here/x/" in b.error_message
    assert w.fake.job_names() == []


def test_find_job_reads_every_page_and_prefers_a_live_job(vworld) -> None:
    w = vworld()
    enqueue(w, 3)
    batch_id, _ = w.store.claim_batch(1000, w.config.embedding.model, w.clock())
    first = w.backend.submit(batch_id, w.store.batch_items(batch_id))
    w.fake.final_state = "FAILED"
    w.fake.finish(first)
    second = w.backend.submit(batch_id, w.store.batch_items(batch_id))
    assert w.fake.max_page_size == 1  # two matches: two pages
    assert w.backend.find_job(batch_id) == second


def test_jobs_of_another_database_are_never_adopted(vworld, tmp_path) -> None:
    a = vworld()
    b = vworld(database={"path": str(tmp_path / "other.db")})
    assert a.store.instance_id != b.store.instance_id
    enqueue(a, 3)
    enqueue(b, 3)
    a.manager.flush_queue()
    assert a.backend.find_job(1) == a.store.batch(1).google_job_id
    assert b.backend.find_job(1) is None
    b.manager.flush_queue()
    assert b.backend.find_job(1) == b.store.batch(1).google_job_id != a.store.batch(1).google_job_id
