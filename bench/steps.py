"""Measurements that run in a child process of their own, so each one's peak memory is clean.

``python -m bench.steps NAME JSON-ARGS`` prints one JSON object (the result) as its last stdout line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

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


def sync(db: str, vectors: int) -> dict[str, Any]:
    """BatchManager.sync_status() over the prepared database: vectors/s and peak RSS growth."""
    from batchd.backends import make_backend
    from batchd.manager import BatchManager
    from batchd.store import Store

    cfg = data.config(Path(db))
    store = Store.open(cfg)
    manager = BatchManager(store, make_backend(cfg, store.instance_id), cfg)
    import gc

    gc.collect()
    base = reset_peak()
    started = time.perf_counter()
    summary = manager.sync_status()
    seconds = time.perf_counter() - started
    growth = peak_growth_mb(base)
    stats = store.queue_stats()
    store.close()
    if summary.applied != vectors or stats["ready"] != vectors:
        raise SystemExit(f"sync applied {summary.applied} of {vectors} (ready={stats['ready']}): {summary.as_dict()}")
    return {"vectors": summary.applied, "seconds": seconds, "per_s": summary.applied / seconds,
            "peak_rss_mb": growth}


def limit_parse(files: list[str]) -> dict[str, Any]:
    n, full, loads = reference.parse_only([Path(f) for f in files])
    return {"lines": n, "seconds": full, "loads_seconds": loads}


def limit_write(files: list[str], db: str) -> dict[str, Any]:
    n, seconds = reference.write_only([Path(f) for f in files], Path(db))
    return {"rows": n, "seconds": seconds}


def naive(files: list[str], db: str, limit: int | None = None) -> dict[str, Any]:
    n, seconds = reference.naive([Path(f) for f in files], Path(db), limit)
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
    "sync": sync, "limit_parse": limit_parse, "limit_write": limit_write, "naive": naive, "stats": stats,
}

if __name__ == "__main__":
    name, args = sys.argv[1], json.loads(sys.argv[2])
    out = STEPS[name](**args)
    sys.stdout.flush()
    os.write(1, (json.dumps(out) + "\n").encode())
