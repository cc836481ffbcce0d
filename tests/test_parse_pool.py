"""batchd.parse_pool / parse_worker (issue 15): the raw output of a job parsed in ``python -m batchd.parse_worker``
processes gives exactly the lines the backend's own parser gives, names malformed lines by file and line, fails
as one line naming the worker's own error, and leaves no process behind on any way out."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.backends import BackendError, Stopped
from batchd.parse_pool import ParsePool, line_chunks, worker_count
from tests.conftest import merge
from tests.fakes.membackend import ScriptedLines, fake_vector, set_knobs

RAW = "tests.fakes.membackend:RawScriptedBackend"
DIMS = 16


def workers_of(pid: int) -> list[int]:
    """The parse worker processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"batchd.parse_worker" in cmd:
            out.append(int(d.name))
    return out


def line(key: str, text: str) -> bytes:
    import json
    import struct

    vec = list(struct.unpack(f"<{DIMS}f", fake_vector(text, DIMS)))
    return json.dumps({"key": key, "values": vec, "error": None, "tokens": 2}).encode() + b"\n"


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
       cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
       size=st.integers(min_value=1, max_value=120), final_newline=st.booleans())
def test_line_chunks_are_whole_lines(lines, cuts, size, final_newline) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    blocks, pos = [], 0
    for c in cuts + [len(data)]:
        blocks.append(data[pos:pos + c])
        pos += c
    blocks.append(data[pos:])
    pieces = [b"".join(bytes(p) for p in parts) for parts in line_chunks([b for b in blocks if b], size)]
    assert b"".join(pieces) == (data if not data or data.endswith(b"\n") else data + b"\n")
    assert all(piece.endswith(b"\n") for piece in pieces)


@settings(max_examples=8, deadline=None)
@given(files=st.lists(st.tuples(st.integers(min_value=1, max_value=60),
                                st.sets(st.integers(min_value=0, max_value=59), max_size=6),
                                st.sets(st.integers(min_value=0, max_value=59), max_size=3)),
                      min_size=1, max_size=6),
       chunk_bytes=st.integers(min_value=1, max_value=2000))
def test_malformed_lines_are_named_by_their_line_in_their_file(files, chunk_bytes) -> None:
    """The workers count each chunk's lines and the chunks come back out of order: the line numbers must still
    be those of the file (blank lines counted, not reported)."""
    expected: list[tuple[str, int]] = []
    raw: list[tuple[str, list[bytes]]] = []
    for f, (n, bad, blank) in enumerate(files):
        out = []
        for i in range(n):
            if i in blank:  # blank wins over bad
                out.append(b"  \r\n" if i % 2 else b"\n")
            elif i in bad:
                out.append(b"{not json\n")
                expected.append((f"f{f}.jsonl", i + 1))
            else:
                out.append(line(f"k{f}-{i}", f"t{i}"))
        blob = b"".join(out)
        raw.append((f"f{f}.jsonl", [blob[j:j + 97] for j in range(0, len(blob), 97)]))
    spec = ("tests.fakes.membackend:ScriptedLines", {"dimensions": DIMS})
    seen: list[tuple[str, int]] = []
    with ParsePool(spec, 2, on_malformed=lambda f, n: seen.append((f, n)), chunk_bytes=chunk_bytes) as pool:
        got = [r for r in pool.lines(raw)]
    assert sorted(seen) == sorted(expected)
    assert sum(1 for r in got if r.keys) == sum(n - len({i for i in bad | blank if i < n}) for n, bad, blank in files)


def test_worker_count_auto_needs_two_cpus_and_a_big_batch() -> None:
    assert worker_count(0, 10**6) == 0 and worker_count(3, 1) == 3
    cpus = len(os.sched_getaffinity(0))
    assert worker_count("auto", 4_999) == 0
    assert worker_count("auto", 5_000) == (min(2, cpus) if cpus >= 2 else 0)


def test_the_pool_gives_the_lines_the_parser_gives_and_names_malformed_lines() -> None:
    texts = [f"text {i}" for i in range(200)]
    blob = b"".join(line(f"k{i}", t) for i, t in enumerate(texts))
    bad: list[tuple[str, int]] = []
    spec = ("tests.fakes.membackend:ScriptedLines", {"dimensions": DIMS})
    files = [("a.jsonl", [blob[:1000], blob[1000:]]), ("b.jsonl", [b"\n{not json\n", line("z", "last")])]
    with ParsePool(spec, 2, on_malformed=lambda f, n: bad.append((f, n)), chunk_bytes=700) as pool:
        got = {tuple(r.keys): r for r in pool.lines(files)}
        assert pool.peak_rss_kb > 0  # each worker reports its own peak (the benchmark counts it)
    local = ScriptedLines(DIMS)
    for i, t in enumerate(texts):
        assert got[(f"k{i}",)] == local.parse(line(f"k{i}", t))
    assert got[("z",)].vector == fake_vector("last", DIMS)
    assert bad == [("b.jsonl", 2)]  # line 1 is empty (skipped), line 2 names no row
    assert got[()].error == "an output line tied to no row"


@pytest.mark.parametrize("kwargs, says", [
    ({"die_at": 3}, "parse worker failed (exit status 3)"),
    ({"raise_at": 3}, "ValueError: scripted parser failure"),
])
def test_a_worker_that_dies_or_raises_is_one_line_and_no_process_is_left(kwargs, says) -> None:
    blob = b"".join(line(f"k{i}", f"t{i}") for i in range(50))
    spec = ("tests.fakes.membackend:ScriptedLines", {"dimensions": DIMS, **kwargs})
    with pytest.raises(BackendError) as e, ParsePool(spec, 2, chunk_bytes=200) as pool:
        list(pool.lines([("r.jsonl", [blob])]))
    msg = str(e.value)
    assert says in msg and "\n" not in msg and msg.startswith("parse worker"), msg
    assert workers_of(os.getpid()) == []


def test_stopped_mid_read_kills_the_workers() -> None:
    """A stop request (SIGTERM in the daemon) raised by the backend's progress call between two blocks."""
    spec = ("tests.fakes.membackend:ScriptedLines", {"dimensions": DIMS})
    started = time.monotonic()
    seen: list[int] = []

    def endless():
        for n in range(10**9):  # never ends: only the stop ends the read
            if n == 20:
                seen.extend(workers_of(os.getpid()))
                raise Stopped()
            yield line("k", "t") * 200

    with pytest.raises(Stopped), ParsePool(spec, 2, chunk_bytes=4096) as pool:
        for _ in pool.lines([("r.jsonl", endless())]):
            pass
    assert len(seen) == 2  # they were running
    assert workers_of(os.getpid()) == []
    assert time.monotonic() - started < 30


def test_wait_runs_while_blocked_on_slow_workers_and_may_stop_them() -> None:
    """While this process waits on busy workers, ``wait`` (the watchdog ping, the stop check) still runs."""
    spec = ("tests.fakes.membackend:ScriptedLines", {"dimensions": DIMS, "sleep": 5.0})
    calls = 0

    def wait() -> None:
        nonlocal calls
        calls += 1
        raise Stopped()

    started = time.monotonic()
    with pytest.raises(Stopped), ParsePool(spec, 1, wait=wait) as pool:
        list(pool.lines([("r.jsonl", [line("k", "t")])]))
    assert calls == 1 and time.monotonic() - started < 4.5
    assert workers_of(os.getpid()) == []


def config_raw(tmp_path: Path, **sections):
    from batchd.config import from_dict

    base = {"database": {"path": str(tmp_path / "app.db")},
            "queue": {"min_batch_size": 1, "max_batch_size": 1000, "max_attempts": 3},
            "embedding": {"backend": RAW, "model": "test-model", "dimensions": DIMS},
            "daemon": {"parse_workers": 2}}
    return from_dict(merge(base, sections), source=str(tmp_path / "batchd.toml"))


@pytest.fixture
def raw_job(tmp_path, clock):
    """``raw_job(n)``: a manager on RawScriptedBackend with two parse workers and one submitted batch of ``n``
    texts; ``(manager, store)``. The store is closed, and no worker may be left, at the end."""
    from batchd.backends import make_backend
    from batchd.manager import BatchManager
    from batchd.store import Store

    cfg = config_raw(tmp_path)
    store = Store.open(cfg)

    def make(n: int) -> tuple[BatchManager, Store]:
        m = BatchManager(store, make_backend(cfg, store.instance_id), cfg, clock=clock)
        m.enqueue([(None, f"text {i}") for i in range(n)])
        m.flush_queue(force=True)
        return m, store

    try:
        yield make
    finally:
        store.close()
    assert workers_of(os.getpid()) == []


def test_a_worker_dying_mid_job_defers_the_batch_with_the_reason_and_applies_nothing(raw_job, tmp_path) -> None:
    m, store = raw_job(120)
    set_knobs(tmp_path / "testbackend", parser_die_at=30, malformed_line=True)
    with structlog.testing.capture_logs() as logs:
        s = m.sync_status()
    assert s.finished == 0 and s.applied == 0 and len(s.errors) == 1
    b = store.batch(1)
    assert b.status == "RUNNING" and b.error_message.startswith(
        "reading results failed, will retry: parse worker failed (exit status 3)"), b.error_message
    assert store.queue_stats()["ready"] == 0
    assert any(e["event"] == "job.parse_workers" and e["workers"] == 2 for e in logs)
    set_knobs(tmp_path / "testbackend", malformed_line=True)
    with structlog.testing.capture_logs() as logs:
        s = m.sync_status()
    assert s.finished == 1 and s.applied == 120, s
    assert [(e["file"], e["line"]) for e in logs if e["event"] == "job.output_malformed"] == [("errors.jsonl", 1)]
    assert store.batch(1).unmatched_lines == 1


def test_garbage_output_is_logged_twenty_times_then_once_and_counted_in_full(raw_job, tmp_path) -> None:
    """An output batchd cannot read (a changed format, garbage) must not write a warning per line at every sync."""
    from batchd.logs import MALFORMED_LOGGED

    m, store = raw_job(40)
    set_knobs(tmp_path / "testbackend", malformed_line=60)
    with structlog.testing.capture_logs() as logs:
        s = m.sync_status()
    assert s.finished == 1 and s.applied == 40, s
    said = [e for e in logs if e["event"].startswith("job.output_malformed")]
    assert [e["event"] for e in said] == ["job.output_malformed"] * MALFORMED_LOGGED + ["job.output_malformed_more"]
    assert [e["line"] for e in said] == list(range(1, MALFORMED_LOGGED + 2))
    assert store.batch(1).unmatched_lines == 60
    assert [e["lines"] for e in logs if e["event"] == "job.output_unmatched"] == [60]


def test_workers_that_cannot_start_fall_back_to_parsing_in_process(raw_job, tmp_path) -> None:
    """A worker that cannot start (here: its parser does not import; on a server, a sandbox that refuses it) is
    found before any output is read: the batch is parsed in the daemon's own process, with a warning."""
    m, store = raw_job(40)
    set_knobs(tmp_path / "testbackend", parser_missing=True)
    with structlog.testing.capture_logs() as logs:
        s = m.sync_status()
    assert s.finished == 1 and s.applied == 40, s
    warn = [e for e in logs if e["event"] == "job.parse_workers_unavailable"]
    assert len(warn) == 1 and warn[0]["log_level"] == "warning"
    assert warn[0]["error"].startswith("parse worker could not start (exit status 1)")
    assert "No module named 'tests.fakes.no_such_module'" in warn[0]["error"]
