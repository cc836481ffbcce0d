"""Syncing a full classic job (30,000 rows x 768 dims) keeps memory bounded: results are streamed.

Memory is measured as the growth of this process's resident set during the sync, sampled by a thread
(the storage emulator is a separate process; the fake JobService is idle while batchd reads results).
The figure is printed; the bound asserted is generous (150 MB) against the ~100 MB of JSON read.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.fakes.fake_vertex import fake_vector
from tests.fakes.vertex_env import fake_vertex, gcs, vworld
from tests.storehelp import store_vector

ROWS = 30_000
DIMS = 768


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self) -> None:
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1e6


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="measures RSS through /proc")
def test_full_classic_job_syncs_in_bounded_memory(vworld) -> None:
    w = vworld(embedding={"model": "text-embedding-005", "dimensions": DIMS},
               queue={"max_batch_size": ROWS})
    texts = [f"row {i}" for i in range(ROWS)]
    w.manager.enqueue([(None, t) for t in texts])
    assert w.manager.flush_queue().created == [1]
    w.fake.finish()
    names = w.gcs.names("batchd-test", w.backend.batch_prefix(1) + "output/")
    size = sum(w.gcs.client().bucket("batchd-test").get_blob(n).size for n in names)

    started = time.monotonic()
    with PeakRSS() as mem:
        summary = w.manager.sync_status()
    elapsed = time.monotonic() - started
    print(f"\nsynced {ROWS} rows x {DIMS} dims ({size / 1e6:.0f} MB of output JSON) in {elapsed:.1f}s; "
          f"RSS {mem.base / 1e6:.0f} MB -> peak {mem.peak / 1e6:.0f} MB (+{mem.growth_mb:.0f} MB)")
    assert summary.applied == ROWS and not summary.errors
    assert w.store.vector_count() == ROWS
    for cid in (1, 12_345, ROWS):
        assert store_vector(w.store, cid) == fake_vector(texts[cid - 1], DIMS)
    assert mem.growth_mb < 150
