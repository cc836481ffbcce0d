"""The gemini-api backend end to end, in process: BatchManager, the real Store, and the REAL GeminiApiBackend
(the real google-genai client over HTTP) against the fake Gemini API of tests/fakes/fake_gemini_api.py.

Every scenario checks the invariants of the Vertex backend: every chunk READY with the right vector or back in
the queue / FAILED with a reason, at most one remote batch per local batch, and "texts sent again after the
service had answered them" = 0 (the fake counts them)."""

from __future__ import annotations

import pytest

from tests.fakes.fake_gemini_api import API_KEY, decode, expected_values
from tests.fakes.gemini_env import fake_gemini, gworld
from tests.storehelp import store_chunks, store_vector

DIMS = 8


def texts(n: int, prefix: str = "chunk") -> list[str]:
    return [f"{prefix} {i}: notes on topic {i % 7}" for i in range(n)]


def assert_ready(w, rows, dims: int = DIMS, out_dims: int | None = None) -> None:
    for row in rows:
        assert row["embedding_status"] == "READY", row
        got, want = decode(store_vector(w.store, row["id"])), expected_values(row["text"], dims, out_dims)
        assert len(got) == dims and max(abs(a - b) for a, b in zip(got, want)) < 1e-6, row["text"]


def test_end_to_end(gworld) -> None:
    w = gworld()
    fake = w.fake
    corpus = texts(300) + ["chunk 5: notes on topic 5"]  # one duplicate: sent once
    fail = {"chunk 11: notes on topic 4": "fake: content blocked"}
    drop = {"chunk 17: notes on topic 3"}
    fake.fail, fake.drop, fake.malformed = fail.get, drop.__contains__, 2
    w.manager.enqueue([(None, t) for t in corpus])

    assert w.manager.flush_queue().created == [1]
    [batch] = fake.ours()
    assert batch.display_name == f"batchd-{w.store.instance_id}-1"
    assert fake.texts_sent == 300  # the duplicate went once

    fake.step()  # RUNNING: nothing to apply yet
    assert w.manager.sync_status().finished == 0
    fake.finish()
    summary = w.manager.sync_status()
    assert summary.finished == 1 and not summary.errors

    rows = store_chunks(w.store)
    bad = [r for r in rows if r["text"] in fail or r["text"] in drop]
    assert {r["error_message"] for r in bad} == {"fake: content blocked", "missing from the job's output"}
    assert all(r["embedding_status"] == "PENDING" and r["attempts"] == 1 and r["batch_job_id"] is None for r in bad)
    assert_ready(w, [r for r in rows if r not in bad])
    assert w.store.batch(1).unmatched_lines == 2  # the two garbage lines, counted, never applied
    assert w.store.batch(1).token_count == 6 * 298  # "tokenCount": "6" (a string) on each of the 298 answers
    # cleanup: the uploaded input, the result file and the finished batch are gone
    assert fake.files == {} and batch.deleted

    before = (store_chunks(w.store), w.store.vector_count())
    assert w.manager.sync_status().checked == 0
    assert (store_chunks(w.store), w.store.vector_count()) == before

    fake.fail, fake.drop = (lambda t: None), (lambda t: False)
    assert w.manager.flush_queue().created == [2]
    fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store))
    assert fake.sent_again_after_answer == 0


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_lost_create_is_adopted_and_others_batches_untouched(gworld, mode: str) -> None:
    w = gworld()
    fake = w.fake
    foreign = [fake.add_foreign_batch(f"batchd-{w.store.instance_id}x-1"),  # a near miss of our display name
               fake.add_foreign_batch("nightly-eval"), fake.add_foreign_batch("batchd-0000aaaa0000-1")]
    fake.max_page_size, fake.empty_pages = 1, True  # short pages, some empty, all with a nextPageToken
    fake.lose_create, fake.lose_create_mode = 1, mode
    w.manager.enqueue([(None, t) for t in texts(20)])

    assert w.manager.flush_queue().created == [1]
    assert fake.count("create") == 1 and len(fake.ours()) == 1
    assert w.store.batch(1).status == "RUNNING"
    assert w.store.batch(1).google_job_id == f"batches/{fake.ours()[0].id}"
    assert fake.count("list") > 4  # every page was read

    fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store))
    for name in foreign:
        assert fake.touched(name) == [], name
        assert fake.state(name) == "RUNNING"


def test_lost_create_found_at_the_next_cycle(gworld) -> None:
    """The create's answer is lost AND the lookup fails: the batch waits; the next cycle adopts, never re-creates."""
    w = gworld()
    fake = w.fake
    fake.lose_create = 1
    fake.fail_next(503, times=100, op="list")
    w.manager.enqueue([(None, t) for t in texts(10)])
    assert w.manager.flush_queue().created == [1]
    b = w.store.batch(1)
    assert b.status == "PENDING" and b.google_job_id is None and "creating the batch failed" in b.error_message
    fake._faults.clear()
    w.manager.flush_queue()
    assert fake.count("create") == 1 and len(fake.ours()) == 1
    assert w.store.batch(1).google_job_id == f"batches/{fake.ours()[0].id}"
    fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store))


def test_429_is_a_deferral(gworld) -> None:
    """An enqueued-token quota (429 on create) makes the batch wait: no retry storm, no attempt counted, the
    uploaded input reused; 429s on polling are retried with backoff."""
    w = gworld()
    fake = w.fake
    fake.fail_next(429, times=2, op="create", message="You exceeded your current quota")
    w.manager.enqueue([(None, t) for t in texts(10)])
    for _ in range(2):
        w.manager.flush_queue()
        b = w.store.batch(1)
        assert b.status == "PENDING" and b.google_job_id is None
        assert "quota" in b.error_message and "429" in b.error_message
        assert {r["attempts"] for r in store_chunks(w.store)} == {0}
    assert fake.count("create") == 2  # one request per cycle: never retried in a loop
    w.manager.flush_queue()
    assert w.store.batch(1).status == "RUNNING" and fake.count("create") == 3
    assert fake.count("upload_start") == 1  # the input was uploaded once and found again
    fake.finish()
    fake.fail_next(429, times=3, op="get")
    assert w.manager.sync_status().finished == 1
    assert_ready(w, store_chunks(w.store))
    assert {r["attempts"] for r in store_chunks(w.store)} == {0}


def test_failed_batch_partial_results_applied_rest_resent(gworld) -> None:
    w = gworld()
    fake = w.fake
    fake.final_state, fake.partial, fake.shuffle = "FAILED", 0.6, False
    corpus = texts(50)
    w.manager.enqueue([(None, t) for t in corpus])
    w.manager.flush_queue()
    fake.finish()
    w.manager.sync_status()

    rows = store_chunks(w.store)
    done = [r for r in rows if r["embedding_status"] == "READY"]
    rest = [r for r in rows if r["embedding_status"] != "READY"]
    assert len(done) == 30 and len(rest) == 20
    assert_ready(w, done)
    assert all(r["embedding_status"] == "PENDING" and r["attempts"] == 1 for r in rest)
    assert all("job FAILED: fake: the batch failed part way" in r["error_message"] for r in rest)
    assert w.store.batch(1).status == "FAILED"
    assert fake.files == {}  # the uploaded texts and the partial result file are deleted once it is applied

    fake.final_state, fake.partial = "SUCCEEDED", None
    assert w.manager.flush_queue().created == [2]
    fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store))
    assert fake.sent_again_after_answer == 0
    assert fake.texts_sent == 50 + 20  # the 20 without a result, and only those


def test_expired_result_file_sends_the_batch_back(gworld) -> None:
    w = gworld()
    fake = w.fake
    fake.expire_results = True
    w.manager.enqueue([(None, t) for t in texts(10)])
    w.manager.flush_queue()
    fake.finish()
    summary = w.manager.sync_status()
    assert summary.finished == 1
    b = w.store.batch(1)
    assert b.status == "FAILED" and "result file" in b.error_message and "48 hours" in b.error_message
    rows = store_chunks(w.store)
    assert all(r["embedding_status"] == "PENDING" and r["batch_job_id"] is None for r in rows)
    assert all("48 hours" in r["error_message"] for r in rows)

    fake.expire_results = False
    assert w.manager.flush_queue().created == [2]
    fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store))


def test_parent_vectors_cut_and_renormalised(gworld) -> None:
    """Vectors longer than asked (3,072 for 768) keep their first 768 values, scaled to unit length."""
    w = gworld(embedding={"dimensions": 768})
    w.fake.output_dims = 3072
    w.manager.enqueue([(None, t) for t in texts(5)])
    w.manager.flush_queue()
    w.fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store), dims=768, out_dims=3072)


def test_cancel_and_timeout_cancel_remotely(gworld, clock) -> None:
    w = gworld(queue={"job_timeout": "1h"})
    fake = w.fake
    w.manager.enqueue([(None, t) for t in texts(4)])
    w.manager.flush_queue()
    [b] = fake.ours()
    assert w.manager.cancel(1)
    assert fake.state(f"batches/{b.id}") == "CANCELLED"
    assert {r["attempts"] for r in store_chunks(w.store)} == {0}

    w.manager.flush_queue()  # the chunks go out again
    b2 = fake.ours()[-1]
    clock.advance(2 * 3600)
    w.manager.sync_status()
    assert fake.state(f"batches/{b2.id}") == "CANCELLED"
    # Deleted only once it had ended (cancelled first: deleting a batch does not cancel it), with its files.
    assert b2.deleted and b2.input_file not in fake.files


def test_cleanup_off_keeps_files(gworld) -> None:
    w = gworld(gemini_api={"cleanup": False})
    w.manager.enqueue([(None, t) for t in texts(3)])
    w.manager.flush_queue()
    w.fake.finish()
    w.manager.sync_status()
    assert_ready(w, store_chunks(w.store))
    assert len(w.fake.files) == 2 and not w.fake.ours()[0].deleted


def test_bad_key_waits_without_attempts_and_is_never_shown(gworld, tmp_path, capsys) -> None:
    w = gworld()
    w.fake.api_key = "the-real-key-the-service-expects"
    w.manager.enqueue([(None, t) for t in texts(3)])
    w.manager.flush_queue()
    b = w.store.batch(1)
    assert b.status == "PENDING" and "refused the API key" in b.error_message
    assert {r["attempts"] for r in store_chunks(w.store)} == {0}
    checks = w.backend.check()
    assert [c.ok for c in checks] == [True, False]
    assert "gemini_api.api_key_file" in checks[0].detail
    out = capsys.readouterr()
    for text in (b.error_message, *(c.detail for c in checks), out.out, out.err):
        assert API_KEY not in text


def test_search_embeds_the_query_online(gworld) -> None:
    from batchd.search import search

    w = gworld()
    corpus = texts(12)
    w.manager.enqueue([(None, t) for t in corpus])
    w.manager.flush_queue()
    w.fake.finish()
    w.manager.sync_status()
    [hit, *_] = search(w.store, w.backend, corpus[7], k=3)
    assert hit.text == corpus[7] and hit.distance < 1e-5
    assert w.fake.count("embed") == 1


@pytest.mark.slow
def test_results_stream_in_bounded_memory(gworld) -> None:
    """A ~22 MB result file is downloaded to disk and read line by line: reading it grows the process by far
    less than its size. (The backend alone is measured: applying the vectors fills SQLite's 32 MB page cache.)"""
    import os

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("measures RSS through /proc")
    from tests.test_vertex_memory import PeakRSS

    rows, dims = 5_000, 768
    w = gworld(embedding={"dimensions": dims}, queue={"max_batch_size": rows})
    w.fake.shuffle = False
    w.manager.enqueue([(None, f"row {i}") for i in range(rows)])
    assert w.manager.flush_queue().created == [1]
    w.fake.finish()
    [batch] = w.fake.ours()
    size = len(w.fake.files[batch.output_file.removeprefix("files/")].data)
    w.backend.status(f"batches/{batch.id}")  # the client is warm before measuring
    lines = 0
    with PeakRSS() as mem:
        for line in w.backend.results(f"batches/{batch.id}"):
            assert line.vector is not None
            lines += 1
    print(f"\nread {rows} x {dims} ({size / 1e6:.0f} MB of result JSON): RSS +{mem.growth_mb:.1f} MB")
    assert lines == rows
    assert mem.growth_mb * 1e6 < size / 2  # holding the file whole would take more than its size


def test_discard_cancels_before_deleting_and_spares_others(gworld) -> None:
    """What check --live uses to leave nothing behind: an unfinished batch is cancelled, then deleted (deleting
    alone would leave it running, and billed); the input file goes too; other batches are not touched."""
    from batchd.backends import Item

    w = gworld()
    fake = w.fake
    other = fake.add_foreign_batch("batchd-someone-else-0")
    name = w.backend.submit(0, [Item("k1", "one"), Item("k2", "two")])
    assert w.backend.output_files(name) == []
    [b] = fake.ours()
    assert w.backend.discard(0) == 2  # the batch and its input file
    assert b.state == "CANCELLED" and b.deleted
    assert fake.files == {}
    assert fake.touched(other) == [] and fake.state(other) == "RUNNING"
    assert w.backend.discard(0) == 0  # idempotent


def test_only_the_experimental_warning_of_create_embeddings_is_silenced(gworld) -> None:
    """google-genai warns on every create_embeddings call (experimental): that warning is silenced around that
    call only; batchd installs no global filter, so every other warning still shows."""
    import warnings

    from batchd.backends import Item

    w = gworld()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        w.backend.submit(1, [Item("k1", "one")])
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(x.message) for x in seen] == ["another warning"]
