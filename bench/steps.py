"""Measurements that run in a child process of their own, so each one's peak memory is clean.

``python -m bench.steps NAME JSON-ARGS`` prints one JSON object (the result) as its last stdout line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import data, reference


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the current RSS in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def peak_growth_mb(baseline_kb: int) -> float:
    return max(0, _status_kb("VmHWM") - baseline_kb) / 1024


def _config(db: str, vertex: dict[str, Any] | None, **over: Any) -> Any:
    if vertex is None:
        return data.config(Path(db), **over)
    return data.config(Path(db), backend="vertex", vertex=vertex, **over)


def sync(db: str, vectors: int, vertex: dict[str, Any] | None = None, parse_workers: str | int = "auto",
         model: str | None = None) -> dict[str, Any]:
    """BatchManager.sync_status() over the prepared database: vectors/s and peak RSS growth, the parse
    workers' own peak RSS counted in (each worker's whole RSS, as it reports it: the largest, times their number).

    With ``vertex`` settings the real VertexBackend reads the job from the fake JobService and the storage
    emulator; without, the bench's FilesBackend streams local files (batchd's apply path alone)."""
    import structlog.testing

    from batchd.backends import make_backend
    from batchd.manager import BatchManager
    from batchd.parse_pool import worker_count
    from batchd.store import Store

    over: dict[str, Any] = {"daemon": {"parse_workers": parse_workers}}
    if model:
        over["embedding"] = {"model": model}
    cfg = _config(db, vertex, **over)
    store = Store.open(cfg)
    manager = BatchManager(store, make_backend(cfg, store.instance_id), cfg)
    imports = _import_google() if vertex else {"seconds": 0.0, "mb": 0.0}
    import gc

    gc.collect()
    base = reset_peak()
    cpu0 = _cpu()
    started = time.perf_counter()
    with structlog.testing.capture_logs() as logs:  # the workers report their own peak RSS
        summary = manager.sync_status()
    seconds = time.perf_counter() - started
    cpu = tuple(b - a for a, b in zip(cpu0, _cpu()))  # the workers have been waited for: counted as children
    growth = peak_growth_mb(base)
    stats = store.queue_stats()
    store.close()
    if summary.applied != vectors or stats["ready"] != vectors:
        raise SystemExit(f"sync applied {summary.applied} of {vectors} (ready={stats['ready']}): {summary.as_dict()}")
    workers = worker_count(parse_workers, vectors)
    # (Not getrusage(RUSAGE_CHILDREN): Linux carries the forking parent's RSS high-water mark across exec.)
    worker_mb = max((e["peak_rss_mb"] for e in logs if e["event"] == "parse.workers_done"), default=0.0)
    return {"vectors": summary.applied, "seconds": seconds, "per_s": summary.applied / seconds,
            "peak_rss_mb": growth + workers * worker_mb, "process_rss_mb": growth, "workers": workers,
            "worker_rss_mb": worker_mb, "import_seconds": imports["seconds"], "import_mb": imports["mb"],
            "cpu_seconds": cpu[0], "worker_cpu_seconds": cpu[1]}


def _cpu() -> tuple[float, float]:
    """(this process's CPU seconds, its waited-for children's), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


class TimedBackend:
    """A Backend that forwards to another and times its submits, and the reading of the batch's texts
    from the database inside them."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.submit_seconds = 0.0
        self.items_seconds = 0.0

    def _timed_items(self, items: Any) -> Any:
        it = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.items_seconds += time.perf_counter() - started
                return
            self.items_seconds += time.perf_counter() - started
            yield item

    def submit(self, batch_id: int, items: Any, progress: Any = None) -> str:
        started = time.perf_counter()
        try:
            if progress is None:
                return str(self.inner.submit(batch_id, self._timed_items(items)))
            return str(self.inner.submit(batch_id, self._timed_items(items), progress))
        finally:
            self.submit_seconds += time.perf_counter() - started

    def find_job(self, batch_id: int) -> Any:
        return self.inner.find_job(batch_id)

    def status(self, job_name: str) -> Any:
        return self.inner.status(job_name)

    def results(self, job_name: str, progress: Any = None) -> Any:
        return self.inner.results(job_name) if progress is None else self.inner.results(job_name, progress)

    def cancel(self, job_name: str) -> None:
        self.inner.cancel(job_name)


def flush(db: str, chunks: int, vertex: dict[str, Any]) -> dict[str, Any]:
    """BatchManager.flush_queue(force=True) with the real VertexBackend: JSONL staged to the storage emulator,
    jobs created on the fake JobService. Every batch must end RUNNING with all chunks claimed."""
    from batchd.backends import make_backend
    from batchd.manager import BatchManager
    from batchd.store import Store

    cfg = _config(db, vertex)
    store = Store.open(cfg)
    backend = TimedBackend(make_backend(cfg, store.instance_id))
    manager = BatchManager(store, backend, cfg)  # type: ignore[arg-type]
    started = time.perf_counter()
    ids = manager.flush_queue(force=True).created
    seconds = time.perf_counter() - started
    stats = store.queue_stats()
    store.close()
    if stats["running"] != chunks or stats["batches"]["RUNNING"] != len(ids):
        raise SystemExit(f"flush left {stats} for {chunks} chunks in batches {ids}")
    return {"chunks": chunks, "batches": len(ids), "seconds": seconds, "per_s": chunks / seconds,
            "submit_seconds": backend.submit_seconds, "items_seconds": backend.items_seconds}


def _import_google() -> dict[str, float]:
    """Load the Google client libraries before the clock starts: a one-off cost of any process that talks
    to Vertex (reported on its own), not work that grows with the job."""
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    import google.cloud.aiplatform_v1
    import google.cloud.storage  # noqa: F401

    return {"seconds": time.perf_counter() - started, "mb": (_status_kb("VmRSS") - before) / 1024}


def download(db: str, vertex: dict[str, Any], bucket: str, prefix: str) -> dict[str, Any]:
    """Read every output file of a job from the storage emulator the way VertexBackend does (its block
    reader), without splitting or parsing: what the network side of a sync costs here."""
    from batchd.backends import BackendContext
    from batchd.backends.vertex import VertexBackend

    cfg = _config(db, vertex)
    backend = VertexBackend(cfg.vertex, BackendContext.of(cfg, "bench"))
    _import_google()
    started = time.perf_counter()
    total = 0
    for blob in backend.gcs.client.list_blobs(bucket, prefix=prefix):
        for block in backend.gcs.read_blocks(blob):
            total += len(block)
    return {"bytes": total, "seconds": time.perf_counter() - started}


def limit_parse(files: list[str]) -> dict[str, Any]:
    n, full, loads, cpu = reference.parse_only([Path(f) for f in files])
    return {"lines": n, "seconds": full, "loads_seconds": loads, "cpu_seconds": cpu}


def limit_write(files: list[str], db: str) -> dict[str, Any]:
    n, seconds, cpu = reference.write_only([Path(f) for f in files], Path(db))
    return {"rows": n, "seconds": seconds, "cpu_seconds": cpu}


def naive(files: list[str], db: str, limit: int | None = None, defaults: bool = False) -> dict[str, Any]:
    n, seconds = reference.naive([Path(f) for f in files], Path(db), limit, defaults)
    return {"rows": n, "seconds": seconds, "per_s": n / seconds}


def stats(db: str, repeat: int = 7) -> dict[str, Any]:
    """BatchManager.get_queue_stats() on a freshly opened database: first call and median of the rest."""
    from batchd.backends import make_backend
    from batchd.manager import BatchManager
    from batchd.store import Store

    cfg = data.config(Path(db))
    store = Store.open(cfg)
    manager = BatchManager(store, make_backend(cfg, store.instance_id), cfg)
    times = []
    result: dict[str, Any] = {}
    for _ in range(repeat):
        started = time.perf_counter()
        result = manager.get_queue_stats()
        times.append((time.perf_counter() - started) * 1000)
    store.close()
    return {"first_ms": times[0], "median_ms": statistics.median(times[1:]), "stats": result}


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "sync": sync, "flush": flush, "download": download, "limit_parse": limit_parse, "limit_write": limit_write, "naive": naive, "stats": stats,
}

if __name__ == "__main__":
    name, args = sys.argv[1], json.loads(sys.argv[2])
    out = STEPS[name](**args)
    sys.stdout.flush()
    os.write(1, (json.dumps(out) + "\n").encode())
