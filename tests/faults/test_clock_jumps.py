"""Wall-clock jumps (issue 9 item 12): job_timeout and max_wait survive ±1 day; the daemon's scheduler does not stall.

In-process tests step two injected clocks (wall and monotonic) apart; the daemon test runs the real `batchd run`
under libfaketime (Debian's ``faketime`` package; skipped with a message where it is not installed), moving its
wall clock by a day forward and then back while it works.
"""

from __future__ import annotations

import glob
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batchd.backends import make_backend
from batchd.clock import Ages, JumpWatch
from batchd.config import load
from batchd.manager import BatchManager
from batchd.store import Store
from tests.configs import daemon_config
from tests.conftest import batchd_cmd
from tests.fakes.membackend import read_counters, set_knobs
from tests.test_daemon import Daemon, counts, wait_until

DAY = 86400.0


class Clocks:
    """A wall clock and a monotonic clock; ``advance`` moves both (time passes), ``jump`` only the wall clock."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.mono = 1000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def jump(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def jworld(world: Any) -> Any:
    def build(**queue: Any) -> Any:
        w = world(queue={"min_batch_size": 1, **queue})
        clocks = Clocks()
        w.manager = BatchManager(w.store, w.backend, w.config, clock=clocks.wall, monotonic=clocks.monotonic)
        w.clocks = clocks
        return w

    return build


def test_forward_jump_of_a_day_does_not_time_out_running_jobs(jworld: Any) -> None:
    """A forward jump used to cancel every running job (and pay for it again)."""
    w = jworld(job_timeout="2h")
    w.knobs(never_finish=True)
    w.manager.enqueue(iter([(None, "alpha"), (None, "beta")]))
    (batch,) = w.manager.flush_queue(force=True).submitted
    w.manager.sync_status()
    w.clocks.advance(60)
    w.clocks.jump(DAY)
    w.manager.sync_status()
    assert w.store.batch(batch).status == "RUNNING"
    assert read_counters(w.dir).get("cancels", 0) == 0
    # Real time still counts: two hours later the job does time out.
    w.clocks.advance(2 * 3600)
    w.manager.sync_status()
    assert w.store.batch(batch).status == "FAILED" and "timed out" in w.store.batch(batch).error_message


def test_backward_jump_of_a_day_does_not_delay_max_wait(jworld: Any) -> None:
    """After a backward jump, `now - queued_at` was negative for a day: max_wait never came."""
    w = jworld(min_batch_size=100, max_wait="10m")
    w.manager.enqueue(iter([(None, "lonely chunk")]))
    w.manager.prepare()
    assert not w.manager.should_flush()
    w.clocks.jump(-DAY)
    w.clocks.advance(9 * 60)
    assert not w.manager.should_flush()
    w.clocks.advance(60)
    assert w.manager.should_flush()
    assert len(w.manager.flush_queue().submitted) == 1


def test_a_stamp_from_another_process_in_the_future_counts_from_first_sight() -> None:
    """The app (or `batchd enqueue`) may stamp with a clock a day ahead of the daemon's: age starts at zero."""
    clocks = Clocks()
    ages = Ages(clocks.wall, clocks.monotonic)
    assert ages.age("k", clocks.now + DAY) == 0
    clocks.advance(30)
    assert ages.age("k", clocks.now + DAY) == 0  # a new stamp for the key starts over
    stamp = clocks.now - 100
    assert ages.age("k", stamp) == 100
    clocks.jump(-DAY)
    clocks.advance(5)
    assert ages.age("k", stamp) == 105
    ages.age(("batch", 1), stamp)
    ages.age(("batch", 2), stamp)
    ages.keep_only([("batch", 2)], "batch")
    assert ("batch", 1) not in ages._seen and ("batch", 2) in ages._seen and "k" in ages._seen


def test_jump_watch_sees_jumps_not_time_passing() -> None:
    clocks = Clocks()
    seen: list[float] = []
    watch = JumpWatch(seen.append, wall=clocks.wall, monotonic=clocks.monotonic)
    clocks.advance(3600)
    assert watch.check() is None
    clocks.jump(-DAY)
    assert watch.check() == -DAY
    assert watch.check() is None
    clocks.jump(1.0)  # NTP-sized corrections are not jumps
    assert watch.check() is None


# ------------------------------------------------------------------------------------ the daemon, faketime


def _libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def test_daemon_keeps_working_across_wall_clock_jumps(tmp_path: Path, batchd_env: dict[str, str]) -> None:
    """`batchd run` under libfaketime: +1 day with a job in flight (not timed out), then back 2 days (the
    scheduler used to sleep until the old wall-clock run time: a day of doing nothing)."""
    lib = _libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (Debian: apt-get install faketime); .ci/run installs it")
    spec = tmp_path / "faketime"
    spec.write_text("+0\n")
    env = dict(batchd_env, LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(spec), FAKETIME_DONT_FAKE_MONOTONIC="1",
               FAKETIME_CACHE_DURATION="1")
    # max_wait, not min_batch_size, triggers every flush: it is the setting a jump used to break.
    cfg = daemon_config(tmp_path, min_batch_size=1000, queue={"max_wait": "2s", "job_timeout": "1h"})
    db = tmp_path / "app.db"
    set_knobs(tmp_path / "testbackend", never_finish=True)

    def enqueue(texts: list[str]) -> None:
        """As the application would, at the real time (the daemon's clock is the one that jumps)."""
        config = load(cfg)
        store = Store.open(config)
        try:
            BatchManager(store, make_backend(config, store.instance_id), config).enqueue(
                iter([(None, t) for t in texts]))
        finally:
            store.close()

    daemon = Daemon(cfg, env)
    try:
        daemon.wait_event("daemon.ready", timeout=60)
        enqueue([f"before the jumps {i}" for i in range(5)])
        wait_until(lambda: counts(db)["running"] == 5, timeout=60, what="a job in flight")

        start = _stamp(daemon.events()[0])
        spec.write_text("+1d\n")
        wait_until(lambda: sum(e["event"] == "sync.done" and _stamp(e) > start + DAY / 2
                               for e in daemon.events()) >= 3, timeout=60, what="three syncs after the forward jump")
        assert not [e for e in daemon.events() if e["event"] == "job.timed_out"]
        assert read_counters(tmp_path / "testbackend").get("cancels", 0) == 0
        set_knobs(tmp_path / "testbackend", never_finish=False)
        wait_until(lambda: counts(db)["ready"] == 5, timeout=60, what="the job in flight to complete")

        spec.write_text("-1d\n")
        wait_until(lambda: [e for e in daemon.events() if _stamp(e) < start - DAY / 2], timeout=30,
                   what="the daemon's clock a day back")
        enqueue([f"after the jumps {i}" for i in range(5)])
        wait_until(lambda: counts(db)["ready"] == 10, timeout=90, what="chunks queued after the backward jump")
        daemon.proc.terminate()
        assert daemon.finish(timeout=60) == 0
    finally:
        daemon.kill()
    jumps = [e["jump_s"] for e in daemon.events() if e["event"] == "daemon.clock_jumped"]
    assert len(jumps) == 2 and jumps[0] > DAY / 2 and jumps[1] < -DAY, jumps


def _stamp(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
