"""End to end through BatchManager, the real Store and the REAL VertexBackend (real aiplatform and storage
clients) against the fake JobService and a storage emulator, for both model families."""

from __future__ import annotations

import orjson
import pytest

from batchd.backends import JobState
from batchd.cost import cost_report
from batchd.pricing import billable_characters
from tests.fakes.fake_vertex import fake_vector
from tests.fakes.vertex_env import fake_vertex, gcs, vworld
from tests.storehelp import store_chunks, store_vector

N = 2_500
DIMS = 8


def corpus() -> list[str]:
    """2,500 texts; every tenth repeats its neighbour (duplicates inside one batch)."""
    texts = []
    for i in range(N):
        texts.append(texts[-1] if i % 10 == 9 else f"chunk {i}: notes on topic {i % 37}, line {i * 7}")
    return texts


FAIL = {"chunk 5: notes on topic 5, line 35": "fake: content blocked on this line",
        "chunk 1234: notes on topic 13, line 8638": "fake: internal error on this line",
        "chunk 2008: notes on topic 10, line 14056": "fake: token limit exceeded"}  # 2008 has a duplicate (2009)
DROP = {"chunk 777: notes on topic 0, line 5439"}


@pytest.mark.parametrize("model, errors_file, echo_unknown", [
    ("text-embedding-005", False, False),  # failed lines carry a status; echoed instance stripped to content
    ("gemini-embedding-001", True, True),  # failed lines in a separate errors_0001.jsonl
    ("text-embedding-005", True, True),
])
def test_end_to_end(vworld, model: str, errors_file: bool, echo_unknown: bool) -> None:
    w = vworld(embedding={"model": model, "dimensions": DIMS})
    fake = w.fake
    fake.shuffle, fake.split, fake.errors_file, fake.echo_unknown, fake.malformed = True, 3, errors_file, \
        echo_unknown, 2
    fake.fail = FAIL.get
    fake.drop = DROP.__contains__
    texts = corpus()
    w.manager.enqueue([(None, t) for t in texts])

    created = w.manager.flush_queue().created
    assert created == [1, 2, 3]
    assert len(fake.job_names()) == 3 and fake.count("create") == 3

    # Duplicates were sent once: the staged inputs hold each distinct text exactly once.
    sent: list[str] = []
    for batch_id in created:
        for raw in w.staged(batch_id).splitlines():
            line = orjson.loads(raw)
            sent.append(line["request"]["content"]["parts"][0]["text"] if "request" in line else line["content"])
    assert sorted(sent) == sorted(set(texts))
    assert len(sent) == 2_250

    # Jobs still running: nothing changes.
    fake.step()
    summary = w.manager.sync_status()
    assert summary.checked == 3 and summary.finished == 0
    assert w.store.queue_stats()["running"] == N

    fake.finish()
    assert {fake.state(n) for n in fake.job_names()} == {"SUCCEEDED"}
    summary = w.manager.sync_status()
    assert summary.finished == 3 and not summary.errors

    bad = set(FAIL) | DROP
    rows = store_chunks(w.store)
    assert len(rows) == N
    for row, text in zip(rows, texts):
        assert row["text"] == text
        if text in bad:
            assert row["embedding_status"] == "PENDING" and row["attempts"] == 1, row
            assert row["batch_job_id"] is None
            assert row["error_message"] == FAIL.get(text, "missing from the job's output")
            assert store_vector(w.store, row["id"]) is None
        else:
            assert row["embedding_status"] == "READY", row
            assert store_vector(w.store, row["id"]) == fake_vector(text, DIMS, unit=model.startswith("gemini"))
    failed_rows = sum(1 for t in texts if t in bad)
    assert failed_rows == 5  # 3 failed + 1 dropped text, one of them held by two chunks
    batches = w.store.batches()
    assert [b.status for b in batches] == ["COMPLETED"] * 3
    assert sum(b.completed_chunks for b in batches) == N - failed_rows
    assert sum(b.failed_chunks for b in batches) == failed_rows
    assert all(w.objects(b) == [] for b in created)  # staged input and output cleaned up
    # Billed: every distinct text answered, counted from the output's echo of it (VertexBackend's lines).
    answered = {t for t in texts if t not in bad}
    assert cost_report(w.store, w.config, None)["billable_characters"] == sum(map(billable_characters, answered))

    # A second sync changes nothing.
    before = (store_chunks(w.store), w.store.vector_count(), w.store.batches())
    summary = w.manager.sync_status()
    assert summary.checked == 0 and summary.applied == 0
    assert (store_chunks(w.store), w.store.vector_count(), w.store.batches()) == before

    # The retried chunks go out in a fourth job and complete.
    fake.fail = lambda text: None
    fake.drop = lambda text: False
    assert w.manager.flush_queue().created == [4]
    fake.finish()
    w.manager.sync_status()
    assert {r["embedding_status"] for r in store_chunks(w.store)} == {"READY"}
    assert w.store.vector_count() == N


def test_status_carries_stats_and_output(vworld) -> None:
    w = vworld(vertex={"cleanup": False})
    w.manager.enqueue([(None, f"text {i}") for i in range(10)])
    w.manager.flush_queue()
    name = w.store.batch(1).google_job_id
    assert w.backend.find_job(1) == name
    assert w.backend.find_job(2) is None
    info = w.backend.status(name)
    assert info.state is JobState.QUEUED and info.output is None
    w.fake.fail = lambda t: "nope" if t == "text 3" else None
    w.fake.final_state = "PARTIALLY_SUCCEEDED"
    w.fake.finish()
    info = w.backend.status(name)
    assert info.state is JobState.PARTIALLY_SUCCEEDED
    assert (info.succeeded, info.failed) == (9, 1)
    assert info.output and info.output.startswith(w.backend.output_prefix(1) + "prediction-model-")
    w.manager.sync_status()
    assert w.store.batch(1).status == "COMPLETED"
    assert w.store.batch(1).output_uri == info.output
    assert [r["embedding_status"] for r in store_chunks(w.store)].count("READY") == 9
    # cleanup = false keeps the staged objects; cleanup() is then a no-op
    names = w.objects(1)
    assert any(n.endswith("input.jsonl") for n in names) and any(n.endswith("predictions.jsonl") for n in names)
    w.backend.cleanup(1, name)
    assert w.objects(1) == names
