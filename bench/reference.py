"""The reference measurements and fixtures that are not batchd: the physical limit, the naive baseline, a
1,000,000-chunk database, and the application writer of the concurrency test.

These hold their own SQL on purpose: they stand for "what SQLite + sqlite-vec can do at best", "what the seed
did", and "what the application does", none of which is batchd code. Everything batchd does in the benchmark
goes through its public API (the CLI, Store, BatchManager).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from bench import data


def connect(db: Path, *, vec: bool = True) -> Any:
    """A connection with batchd's SQLite library and pragmas (WAL, synchronous=NORMAL), sqlite-vec loaded."""
    from batchd.store import Store

    store = Store.open(data.config(db))  # creates the schema (chunks_vec included) if missing
    module = store.sqlite_module
    store.close()
    conn = module.connect(str(db), isolation_level=None, timeout=10.0)
    if vec:
        import sqlite_vec

        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _lines(files: list[Path]) -> Iterator[bytes]:
    for path in files:
        with path.open("rb", buffering=1 << 20) as f:
            yield from f


def parse_only(files: list[Path]) -> tuple[int, float, float, float]:
    """orjson.loads every line and pack its values into a float32 blob (the least work that turns a result
    line into what SQLite stores). Returns (lines, seconds for loads+pack, seconds for loads alone, CPU seconds
    for loads+pack)."""
    n = 0
    started, cpu = time.perf_counter(), time.process_time()
    for raw in _lines(files):
        obj = orjson.loads(raw)
        array("f", obj["predictions"][0]["embeddings"]["values"]).tobytes()
        n += 1
    full, cpu = time.perf_counter() - started, time.process_time() - cpu
    started = time.perf_counter()
    for raw in _lines(files):
        orjson.loads(raw)
    loads = time.perf_counter() - started
    return n, full, loads, cpu


def write_only(files: list[Path], db: Path) -> tuple[int, float, float]:
    """executemany of pre-serialized float32 blobs into the fresh vec0 table of a new database, one
    transaction. Parsing happens before the clock starts. Returns (rows, seconds, CPU seconds)."""
    rows = [(i + 1, array("f", orjson.loads(raw)["predictions"][0]["embeddings"]["values"]).tobytes())
            for i, raw in enumerate(_lines(files))]
    conn = connect(db)
    started, cpu = time.perf_counter(), time.process_time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO chunks_vec(chunk_id, embedding) VALUES (?, ?)", rows)
    conn.execute("COMMIT")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    conn.close()
    return len(rows), seconds, cpu


def naive(files: list[Path], db: Path, limit: int | None = None, defaults: bool = False) -> tuple[int, float]:
    """The seed's approach: stdlib json, struct.pack, one INSERT + COMMIT per row. Returns (rows, seconds).

    On batchd's connection settings (WAL, synchronous=NORMAL), so only the approach differs; with
    ``defaults`` on SQLite's (rollback journal, synchronous=FULL: every COMMIT waits for the disk)."""
    conn = connect(db)
    if defaults:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = FULL")
    fmt = f"<{data.DIMENSIONS}f"
    n = 0
    started = time.perf_counter()
    for raw in _lines(files):
        obj = json.loads(raw)
        blob = struct.pack(fmt, *obj["predictions"][0]["embeddings"]["values"])
        n += 1
        conn.execute("BEGIN")
        conn.execute("INSERT INTO chunks_vec(chunk_id, embedding) VALUES (?, ?)", (n, blob))
        conn.execute("COMMIT")
        if limit and n >= limit:
            break
    seconds = time.perf_counter() - started
    conn.close()
    return n, seconds


def build_million(db: Path, n: int) -> dict[str, int]:
    """``n`` chunks in a realistic mix: 80% READY, 10% pending, 8% running (claimed by one RUNNING batch),
    2% FAILED. Built with one INSERT ... SELECT (the fixture, not what is measured)."""
    conn = connect(db, vec=False)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO batch_jobs(status, google_job_id, created_at, updated_at) "
                 "VALUES ('RUNNING', 'bench-job', '2026-11-30T09:00:00Z', '2026-11-30T09:00:00Z')")
    batch = conn.execute("SELECT max(id) FROM batch_jobs").fetchone()[0]
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO chunks(id, content, embedding_status, batch_job_id, content_hash, queued_at) "
        "SELECT i, 'chunk ' || i, CASE WHEN i % 100 < 80 THEN 'READY' WHEN i % 100 < 82 THEN 'FAILED' "
        "ELSE 'PENDING' END, CASE WHEN i % 100 >= 92 THEN ? END, lower(hex(randomblob(16))), "
        "'2026-11-30T09:00:00Z' FROM n", (n, batch))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"ready": n * 80 // 100, "failed": n * 2 // 100, "pending": n * 10 // 100, "running": n * 8 // 100}


def app_writer(db: Path, stop: Path, out: Path, interval: float = 0.010) -> None:
    """The application: every ``interval`` seconds insert a chunk and read it back, on its own connection
    (batchd's SQLite library, no sqlite-vec, the app's usual busy_timeout). Writes the waits seen to ``out``
    as JSON when ``stop`` appears."""
    conn = connect(db, vec=False)
    waits: list[float] = []
    started = time.perf_counter()
    i = 0
    while not stop.exists():
        i += 1
        t0 = time.perf_counter()
        cur = conn.execute("INSERT INTO chunks(content) VALUES (?)", (f"app chunk {i} written during sync",))
        row = conn.execute("SELECT content FROM chunks WHERE id = ?", (cur.lastrowid,)).fetchone()
        waits.append(time.perf_counter() - t0)
        assert row is not None
        time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    conn.close()
    out.write_text(json.dumps({"writes": len(waits), "max_ms": max(waits, default=0) * 1000,
                               "p99_ms": sorted(waits)[int(len(waits) * 0.99)] * 1000 if waits else 0,
                               "seconds": time.perf_counter() - started}))


if __name__ == "__main__":  # python -m bench.reference app_writer DB STOP OUT
    if sys.argv[1] == "app_writer":
        app_writer(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
