"""The daemon's Worker stepped in this process with an injected clock: the one wrapper that catches, counts,
backs off and logs recovery; the STATUS= line; shutdown at a slice boundary; --once and --until-idle.
Signals, the scheduler, the watchdog and systemd stay with the subprocess tests (test_daemon.py)."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from batchd import daemon
from batchd.backends import JobInfo
from batchd.manager import BatchManager
from batchd.systemd import Health, Notifier
from tests.conftest import Clock
from tests.fakes.membackend import ScriptedBackend


class BrokenStatus(ScriptedBackend):
    """A backend with a bug: status() answers None (not a JobInfo) while ``broken.json`` exists in its folder."""

    def status(self, job_name: str) -> JobInfo:
        if (self.dir / "broken.json").exists():
            return None  # type: ignore[return-value]
        return super().status(job_name)


def worker_on(w: Any, backend_cls: type = ScriptedBackend, **kw: Any) -> tuple[daemon.Worker, Clock]:
    steps = Clock(0.0)
    manager = BatchManager(w.store, backend_cls(w.config, w.store.instance_id), w.config, clock=w.clock)
    return daemon.Worker(manager, notifier=Notifier({}), health=Health(clock=steps), clock=steps, **kw), steps


def test_a_failing_step_backs_off_doubles_and_logs_its_recovery(world):
    w = world(queue={"sync_interval": "10s"})
    worker, steps = worker_on(w, BrokenStatus)
    w.manager.enqueue([(None, "x")])
    assert worker.flush(force=True).ok
    (w.dir / "broken.json").write_text("{}")

    with capture_logs() as logs:
        first = worker.sync()
        assert not first.ok and worker.steps["sync"].consecutive == 1
        second = worker.sync()  # the first failure is retried at the next tick
        assert not second.ok and worker.steps["sync"].retry_at == 10.0
        assert worker.sync().skipped  # backing off: not run, not counted
        steps.advance(10)
        assert not worker.sync().ok and worker.steps["sync"].retry_at == 10.0 + 30.0  # 3 intervals
    failed = [e for e in logs if e["event"] == "daemon.step_failed"]
    assert [e["consecutive_failures"] for e in failed] == [1, 2, 3]
    assert failed[0]["error"] == "AttributeError: 'NoneType' object has no attribute 'state'"
    assert failed[0]["exc_info"] is True
    assert "sync failing (3x): AttributeError: 'NoneType' object has no attribute 'state'" in worker.status_line()

    (w.dir / "broken.json").unlink()
    steps.advance(25)
    with capture_logs() as logs:
        assert worker.sync().skipped
        steps.advance(5)
        out = worker.sync()
    assert out.ok and out.value.applied == 1
    [rec] = [e for e in logs if e["event"] == "daemon.step_recovered"]
    assert (rec["step"], rec["after_failures"], rec["down_s"]) == ("sync", 3, 40.0)
    assert worker.steps["sync"].consecutive == 0
    line = worker.status_line()
    assert "pending=0 running=0 ready=1 failed=0" in line and "last sync" in line and "failing" not in line


def test_shutdown_stops_a_step_at_a_slice_boundary_and_skips_the_next(world):
    w = world()
    worker, _ = worker_on(w)
    w.manager.enqueue([(None, f"t{i}") for i in range(120)])
    worker.flush(force=True)
    health_before = worker.health.stalled_for()
    worker.stop.set()
    out = worker.sync()
    assert out.skipped and out.stopped  # asked to stop before the step began: not run at all
    worker.stop.clear()

    calls = 0
    progress = worker.progress

    def stop_after_two_slices() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            worker.stop.set()
        progress()

    worker.manager.progress = stop_after_two_slices
    out = worker.sync()
    assert out.ok and out.stopped and out.value.stopped
    assert w.store.batch(1).status == "RUNNING"
    assert health_before == (None, 0.0) and worker.health.stalled_for() == (None, 0.0)  # step ended
    worker.stop.clear()
    worker.manager.progress = progress
    assert worker.sync().value.applied == 120


def test_flush_outcome_feeds_the_status_line_and_logs_a_summary(world):
    w = world(queue={"max_batch_size": 5})
    worker, _ = worker_on(w)
    w.manager.enqueue([(None, f"t{i}") for i in range(12)])
    w.knobs(submit_errors=1)
    with capture_logs() as logs:
        out = worker.flush(force=True)
    assert out.ok and out.value.deferred == [1]
    [done] = [e for e in logs if e["event"] == "flush.done"]
    assert done["created"] == [1] and done["not_submitted"] == [1] and done["submitted"] == []
    out = worker.flush(force=True)
    assert out.value.submitted == [1, 2, 3]
    assert "submitted 3 batches" in worker.status_line()


def test_run_once_and_until_idle_in_process(world):
    w = world(queue={"max_batch_size": 4})
    worker, _ = worker_on(w)
    w.manager.enqueue([(None, f"t{i}") for i in range(10)])
    w.knobs(submit_errors=1)
    assert daemon.run_once(worker) == daemon.EXIT_FAILED  # batch 1 waits to be submitted
    w.knobs(polls_to_finish=1)
    seen: list[dict[str, Any]] = []
    assert daemon.run_until_idle(worker, 0.0, seen.append) == daemon.EXIT_OK
    assert seen[-1]["ready"] == 10 and seen[-1]["pending"] == seen[-1]["running"] == 0


def test_until_idle_gives_up_after_repeated_failures(world):
    w = world(queue={"sync_interval": "1ms", "flush_interval": "1ms"})
    worker, steps = worker_on(w, BrokenStatus)
    w.manager.enqueue([(None, "x")])
    (w.dir / "broken.json").write_text("{}")

    def tick(stats: dict[str, Any]) -> None:
        steps.advance(3600)  # past any backoff: every round runs the failing sync again

    with capture_logs() as logs:
        assert daemon.run_until_idle(worker, 0.0, tick) == daemon.EXIT_FAILED
    [gave_up] = [e for e in logs if e["event"] == "daemon.gave_up"]
    assert gave_up["steps"] == ["sync"] and worker.steps["sync"].consecutive == daemon.GIVE_UP_AFTER
