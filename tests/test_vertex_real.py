"""Vertex AI as it really behaves (issue 10), end to end through BatchManager, the real Store and the REAL
VertexBackend (real aiplatform and storage clients) against the fakes, one switch of tests/fakes/fake_vertex.py
per behaviour. Every test ends with the "never pay twice" figure: texts sent again after the service had
answered them = 0 (:meth:`FakeVertex.resent_after_answer`).
"""

from __future__ import annotations

from array import array
from pathlib import Path

import orjson
import pytest
import structlog
from click.testing import CliRunner

from batchd.cli import main
from tests.fakes.fake_vertex import fake_values, fake_vector
from tests.fakes.vertex_env import fake_vertex, gcs, vworld
from tests.storehelp import store_chunks, store_vector

DIMS = 8


def enqueue(w, n: int = 20, prefix: str = "passage") -> list[str]:
    texts = [f"{prefix} {i} about topic {i % 7}" for i in range(n)]
    w.manager.enqueue([(None, t) for t in texts])
    return texts


def statuses(w) -> dict[str, tuple[str, int]]:
    return {r["text"]: (r["embedding_status"], r["attempts"]) for r in store_chunks(w.store)}


def sent(w, batch_id: int) -> list[str]:
    out = []
    for raw in w.staged(batch_id).splitlines():
        line = orjson.loads(raw)
        out.append(line["request"]["content"]["parts"][0]["text"] if "request" in line else line["content"])
    return out


def never_paid_twice(w) -> None:
    figure = w.fake.resent_after_answer()
    print(f"\ntexts sent again after being answered: {figure}")
    assert figure == 0, w.fake.resent


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


# ---------------------------------------------------------------------- 1. Gemini parent vectors


def test_gemini_parent_vectors_become_the_renormalised_prefix(vworld) -> None:
    """Done-when: a Gemini job answered with 3,072-value vectors for dimensions = 768 ends with every chunk
    READY holding the renormalised 768-value prefix; the cut is logged once per batch."""
    w = vworld(embedding={"model": "gemini-embedding-001", "dimensions": 768})
    w.fake.gemini_parent = True
    w.fake.token_count_string = True
    texts = enqueue(w, 30)
    w.manager.flush_queue()
    w.fake.finish()
    with structlog.testing.capture_logs() as logs:
        s = w.manager.sync_status()
    assert s.applied == 30 and not s.errors
    for r in store_chunks(w.store):
        assert r["embedding_status"] == "READY"
        got = array("f", store_vector(w.store, r["id"]))
        want = fake_values(r["text"], 768)  # the parent's first 768 values, up to its own scale
        norm = sum(x * x for x in want) ** 0.5
        assert len(got) == 768 and abs(sum(x * x for x in got) - 1.0) < 1e-5
        assert max(abs(g - x / norm) for g, x in zip(got, want)) < 1e-6
    [cut] = events(logs, "batch.vectors_cut")
    assert cut["lines"] == 30 and cut["answered_dimensions"] == [3072] and cut["dimensions"] == 768
    # tokenCount is an int64: a JSON string, read all the same (issue 10.4)
    assert w.store.batch(1).token_count == sum(len(t.split()) for t in texts)
    never_paid_twice(w)


# ---------------------------------------------------------------------- 2. terminated jobs export their rows


@pytest.mark.parametrize("model, state", [
    ("text-embedding-005", "FAILED"),
    ("text-embedding-005", "EXPIRED"),
    ("text-embedding-005", "CANCELLED"),
    ("gemini-embedding-001", "FAILED"),
])
def test_failed_job_after_exporting_60_percent_resends_only_the_other_40(vworld, model: str, state: str) -> None:
    """Done-when: a job that fails after exporting 60% of its rows re-sends only the other 40%."""
    w = vworld(embedding={"model": model, "dimensions": DIMS}, vertex={"cleanup": False})
    texts = enqueue(w, 50)
    w.manager.flush_queue()
    w.fake.final_state, w.fake.export_fraction = state, 0.6
    w.fake.finish()
    s = w.manager.sync_status()
    assert s.applied == 30 and s.errored == 20 and s.finished == 1
    b = w.store.batch(1)
    assert b.status == "FAILED" and b.remote_state == state and b.completed_chunks == 30
    answered = set(sent(w, 1)[:30])
    for text, (status, attempts) in statuses(w).items():
        # attempts are counted only for the rows that got no result
        assert (status, attempts) == (("READY", 0) if text in answered else ("PENDING", 1)), text
    w.fake.final_state, w.fake.export_fraction = "SUCCEEDED", None
    assert w.manager.flush_queue().created == [2]
    assert sorted(sent(w, 2)) == sorted(set(texts) - answered) and len(sent(w, 2)) == 20
    w.fake.finish()
    w.manager.sync_status()
    assert {st for st, _ in statuses(w).values()} == {"READY"}
    never_paid_twice(w)


def test_a_failed_jobs_staged_files_are_deleted_once_its_export_is_applied(vworld) -> None:
    """vertex.cleanup: the texts staged for a job that failed (and its partial output) do not stay in the bucket
    once the batch is closed; its chunks go out again in a batch of their own."""
    w = vworld(embedding={"dimensions": DIMS})
    enqueue(w, 20)
    w.manager.flush_queue()
    w.fake.final_state, w.fake.export_fraction = "FAILED", 0.5
    w.fake.finish()
    assert w.objects(1)  # the staged input and the partial output
    w.manager.sync_status()
    assert w.store.batch(1).status == "FAILED" and w.store.batch(1).completed_chunks == 10
    assert w.objects(1) == []


def test_job_timeout_cancel_waits_for_the_export_and_applies_it(vworld) -> None:
    """batchd's own job_timeout cancel: the job goes CANCELLING, then CANCELLED with half its rows exported;
    those are applied, only the rest go back (one attempt each)."""
    w = vworld(queue={"job_timeout": "2h"})
    enqueue(w, 40)
    w.manager.flush_queue()
    name = w.store.batch(1).google_job_id
    w.fake.run_to("RUNNING")
    w.fake.cancel_lag, w.fake.export_fraction = True, 0.5
    w.clock.advance(2 * 3600 + 1)
    s = w.manager.sync_status()
    assert s.finished == 0 and w.fake.state(name) == "CANCELLING" and w.fake.count("cancel") == 1
    b = w.store.batch(1)
    assert b.status == "RUNNING" and "cancel requested" in b.error_message
    assert w.store.queue_stats()["running"] == 40  # still claimed: the export is awaited
    w.manager.sync_status()  # still cancelling: no second cancel request
    assert w.fake.count("cancel") == 1
    w.fake.step(name)  # CANCELLING -> CANCELLED, exporting the rows it completed
    s = w.manager.sync_status()
    assert s.finished == 1 and s.applied == 20 and s.errored == 20
    b = w.store.batch(1)
    assert b.status == "FAILED" and "timed out after 2h" in b.error_message
    assert sorted(statuses(w).values()) == [("PENDING", 1)] * 20 + [("READY", 0)] * 20
    w.fake.cancel_lag, w.fake.export_fraction = False, None
    assert w.manager.flush_queue().created == [2] and len(sent(w, 2)) == 20
    never_paid_twice(w)


def test_job_timeout_cancel_gives_up_after_the_grace(vworld) -> None:
    from batchd.endings import CANCEL_GRACE

    w = vworld(queue={"job_timeout": "2h"})
    enqueue(w, 10)
    w.manager.flush_queue()
    w.fake.run_to("RUNNING")
    w.fake.cancel_lag = True
    w.clock.advance(2 * 3600 + 1)
    w.manager.sync_status()
    assert w.store.batch(1).status == "RUNNING"
    w.clock.advance(CANCEL_GRACE)
    s = w.manager.sync_status()
    assert s.finished == 1
    b = w.store.batch(1)
    assert b.status == "FAILED" and "export was not read" in b.error_message
    assert set(statuses(w).values()) == {("PENDING", 1)}


def test_operator_cancel_applies_what_the_cancelled_job_exported(vworld) -> None:
    w = vworld()
    enqueue(w, 30)
    w.manager.flush_queue()
    w.fake.run_to("RUNNING")
    w.fake.export_fraction = 0.5
    assert w.manager.cancel(1)
    b = w.store.batch(1)
    assert b.status == "FAILED" and b.error_message == "batch cancelled by operator"
    # the exported half is kept; the rest goes back without an attempt counted
    assert sorted(statuses(w).values()) == [("PENDING", 0)] * 15 + [("READY", 0)] * 15
    w.fake.export_fraction = None
    assert w.manager.flush_queue().created == [2] and len(sent(w, 2)) == 15
    never_paid_twice(w)


# ---------------------------------------------------------------------- 3. incremental exports


def test_incremental_copies_are_not_read_as_more_results(vworld) -> None:
    """The output folder holds incremental_predictions/ copies of rows (here: an earlier, failed attempt of
    every row). Only the folder's own files are results: every row is read once and every chunk is READY."""
    w = vworld()
    enqueue(w, 25)
    w.manager.flush_queue()
    w.fake.incremental = True
    w.fake.finish()
    names = w.objects(1)
    assert any("/incremental_predictions/" in n for n in names)
    # an incremental copy that disagrees with the final export: the earlier attempt of each row failed
    [copy] = [n for n in names if "/incremental_predictions/" in n]
    stale = b"".join(orjson.dumps({"instance": orjson.loads(raw)["instance"], "predictions": [],
                                   "status": "fake: transient, retried"}) + b"\n"
                     for raw in w.gcs.read("batchd-test", copy).splitlines())
    w.gcs.client().bucket("batchd-test").blob(copy).upload_from_string(stale)
    with structlog.testing.capture_logs() as logs:
        s = w.manager.sync_status()
    assert s.applied == 25 and s.errored == 0
    assert set(statuses(w).values()) == {("READY", 0)}
    [read] = events(logs, "job.results_read")
    assert read["lines"] == 25
    assert events(logs, "job.output_skipped")[0]["objects"] == 1
    never_paid_twice(w)


# ---------------------------------------------------------------------- 4. token counts, truncation


def test_truncated_inputs_are_recorded_counted_and_warned_once_per_batch(vworld, tmp_path: Path) -> None:
    w = vworld()
    texts = enqueue(w, 20)
    long = {texts[3], texts[11]}
    w.fake.truncate = long.__contains__
    w.manager.flush_queue()
    w.fake.finish()
    with structlog.testing.capture_logs() as logs:
        w.manager.sync_status()
    [warn] = events(logs, "batch.inputs_truncated")
    assert warn["chunks"] == 2 and warn["log_level"] == "warning"
    assert w.store.queue_stats()["truncated"] == 2
    conn = w.store.sqlite_module.connect(w.config.database.path)
    try:
        flagged = {t for t, in conn.execute("SELECT content FROM chunks WHERE truncated = 1")}
    finally:
        conn.close()
    assert flagged == long
    assert w.store.batch(1).token_count == 2 * 2048 + sum(len(t.split()) for t in texts if t not in long)
    never_paid_twice(w)


# ---------------------------------------------------------------------- 5. output line shapes


@pytest.mark.parametrize("switch", [
    {"error_shape": "bare_instance"},
    {"error_shape": "status_only"},
    {"singular_prediction": True},
    {"echo_task": "drop"},
    {"echo_task": "lower"},
    {"echo_task": "camel"},
])
def test_other_output_line_shapes(vworld, switch: dict) -> None:
    w = vworld()
    texts = enqueue(w, 12)
    for k, v in switch.items():
        setattr(w.fake, k, v)
    w.fake.fail = {texts[5]: "fake: blocked"}.get
    w.manager.flush_queue()
    w.fake.finish()
    w.manager.sync_status()
    rows = {r["text"]: r for r in store_chunks(w.store)}
    for t in texts:
        if t == texts[5]:
            assert (rows[t]["embedding_status"], rows[t]["attempts"]) == ("PENDING", 1)
            assert rows[t]["error_message"] == "fake: blocked"
        else:
            assert rows[t]["embedding_status"] == "READY", (t, rows[t])
            assert store_vector(w.store, rows[t]["id"]) == fake_vector(t, DIMS)
    assert w.store.batch(1).unmatched_lines == 0
    never_paid_twice(w)


def test_lines_that_match_no_row_are_counted_and_shown(vworld, tmp_path: Path) -> None:
    """An echo that names no sent text (here: whitespace stripped) matches no row: counted on the batch, in
    the batch.synced line and in `batchd jobs`, instead of silently looking like missing lines."""
    w = vworld()
    texts = enqueue(w, 10, prefix="  padded")
    w.fake.mangle_echo = str.strip
    w.fake.malformed = 2
    w.manager.flush_queue()
    w.fake.finish()
    with structlog.testing.capture_logs() as logs:
        w.manager.sync_status()
    [synced] = events(logs, "batch.synced")
    assert synced["unmatched"] == 12 and synced["missing"] == 10
    assert w.store.batch(1).unmatched_lines == 12
    assert set(statuses(w).values()) == {("PENDING", 1)}
    cfg = tmp_path / "jobs.toml"
    cfg.write_text(f'[database]\npath = "{w.config.database.path}"\n'
                   f'[embedding]\nmodel = "text-embedding-005"\ndimensions = {DIMS}\n')
    r = CliRunner().invoke(main, ["--config", str(cfg), "jobs"])
    assert r.exit_code == 0, r.output
    header, row = r.output.splitlines()[:2]
    assert "unmatched" in header and row.split()[6] == "12"
    r = CliRunner().invoke(main, ["--config", str(cfg), "jobs", "--json"])
    assert orjson.loads(r.output.splitlines()[0])["unmatched_lines"] == 12
    assert len(texts) == 10


# ---------------------------------------------------------------------- 6. PAUSED / UPDATING


@pytest.mark.parametrize("hold", ["PAUSED", "UPDATING"])
def test_paused_and_updating_jobs_are_waited_through(vworld, tmp_path: Path, hold: str) -> None:
    w = vworld()
    enqueue(w, 10)
    w.manager.flush_queue()
    w.fake.hold = hold
    w.fake.finish()
    s = w.manager.sync_status()
    assert s.finished == 0
    b = w.store.batch(1)
    assert b.status == "RUNNING" and b.remote_state == hold
    cfg = tmp_path / "jobs.toml"
    cfg.write_text(f'[database]\npath = "{w.config.database.path}"\n'
                   f'[embedding]\nmodel = "text-embedding-005"\ndimensions = {DIMS}\n')
    r = CliRunner().invoke(main, ["--config", str(cfg), "jobs"])
    assert r.output.splitlines()[1].split()[2] == hold
    w.fake.hold = None
    w.fake.finish()
    w.manager.sync_status()
    assert set(statuses(w).values()) == {("READY", 0)}
    never_paid_twice(w)


def test_the_never_pay_twice_figure_sees_a_resend(vworld) -> None:
    """The figure itself can fail: a text submitted again after its answer was exported is counted."""
    from batchd.backends import Item

    w = vworld()
    texts = enqueue(w, 5)
    w.manager.flush_queue()
    w.fake.finish()
    w.manager.sync_status()
    assert w.fake.resent_after_answer() == 0
    w.backend.submit(99, [Item(f"k{i}", t) for i, t in enumerate(texts[:2])])
    assert w.fake.resent_after_answer() == 2
