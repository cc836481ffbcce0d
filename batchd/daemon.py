"""The daemon: APScheduler wiring, signals and the watchdog around a :class:`~batchd.worker.Worker`. No queue logic.

Three ways to run a :class:`Worker` (one BatchManager, one Store connection):

- :func:`serve` — ``batchd run``: a BlockingScheduler with a ONE-thread executor and two interval jobs
  (flush, sync), so every database call happens on that one thread, one at a time.
- :func:`run_once` — ``batchd run --once``: recover + flush (forced if anything is pending) + sync, then exit.
- :func:`run_until_idle` — ``batchd run --until-idle``: flush + sync every ``poll`` seconds until nothing is
  pending or running.

Start-up waits out a full disk or a busy database (:func:`batchd.startup.wait_for_database`) instead of exiting. A
wall-clock jump makes every step due at once (:class:`~batchd.clock.JumpWatch`): the scheduler's run times are
wall-clock.

Shutdown: SIGTERM/SIGINT only set a flag. The manager's ``progress`` hook (called at every slice boundary)
raises :class:`~batchd.backends.Stopped` once the flag is set, so the running step stops between two
committed slices; the scheduler is shut down, STOPPING=1 is sent and the process exits 0. A second signal
exits at once (SQLite's transactions keep the database whole).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from batchd.clock import JumpWatch
from batchd.errors import one_line
from batchd.logs import fd_is_journal, output_fd
from batchd.systemd import Watchdog, watchdog_interval
from batchd.worker import EXIT_CONFIG, GIVE_UP_AFTER, MAX_BACKOFF, STATUS_EVERY, Outcome, StepState, Worker

log = structlog.get_logger("batchd.daemon")

EXIT_OK = 0
EXIT_FAILED = 1
STOP_TIMEOUT = 60.0  # seconds to wait for the running step after SIGTERM (below the unit's TimeoutStopSec)




# ---------------------------------------------------------------------------------------------- signals


class Signals:
    """SIGTERM/SIGINT set ``stop``; a second one exits at once. Handlers never log or unwind the stack."""

    def __init__(self, stop: threading.Event, reload: threading.Event | None = None):
        self.stop = stop
        self.reload = reload
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.reload is not None:  # SIGHUP = `systemctl reload` (ExecReload=); only the daemon handles it
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hup)
        return self

    def _hup(self, signum: int, frame: Any) -> None:
        assert self.reload is not None
        self.reload.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            # Second signal: leave now. Whatever transaction was open is rolled back by SQLite.
            os.write(output_fd(), (_json_event("daemon.killed", "warning", signal=signal.Signals(signum).name) + "\n").encode())
            os._exit(128 + signum)
        self.received = signum
        self.stop.set()


# ---------------------------------------------------------------------------------------------- modes


def serve(worker: Worker, *, stop_timeout: float = STOP_TIMEOUT, listen: tuple[str, int] | None = None,
          config_path: str | None = None) -> int:
    """``batchd run``: recover, READY=1, then the scheduler until SIGTERM/SIGINT. Returns the exit status.

    ``listen``: serve ``/metrics`` and ``/healthz`` there (needs ``worker.metrics``). With ``config_path``,
    SIGHUP re-reads that file and applies its live keys (:mod:`batchd.reload`).
    """
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers import SchedulerNotRunningError
    from apscheduler.schedulers.blocking import BlockingScheduler

    q = worker.manager.config.queue
    notifier = worker.notifier
    signals = Signals(worker.stop, worker.reload if config_path else None).install()
    watchdog = _start_watchdog(worker)
    log.info("daemon.starting", pid=os.getpid(), flush_interval_s=float(q.flush_interval),
             sync_interval_s=float(q.sync_interval), notify=notifier.enabled,
             watchdog_s=watchdog.interval if watchdog else None)

    worker.manager.accounting.warn_once = True  # a declined flush is said once per budget period, not every tick
    worker.recover()
    server = worker.metrics.serve(worker, listen) if listen is not None and worker.metrics is not None else None
    if server is False:  # the port could not be bound (logged): a daemon asked to serve must not run blind
        signals.restore()
        if watchdog:
            watchdog.stop()
        return EXIT_FAILED
    scheduler = BlockingScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=1)},  # one thread: one SQLite connection user
        job_defaults={
            "max_instances": 1,  # a slow sync is never run twice at once
            "coalesce": True,  # ticks missed during a long step collapse into one run
            "misfire_grace_time": 3600,  # a run delayed by a long step still happens
        },
        timezone=UTC,
    )
    now = datetime.now(UTC)
    scheduler.add_job(lambda: _tick(worker, worker.flush), "interval", seconds=float(q.flush_interval),
                      id="flush", name="flush", next_run_time=now)
    scheduler.add_job(lambda: _tick(worker, worker.sync), "interval", seconds=float(q.sync_interval),
                      id="sync", name="sync", next_run_time=now)

    def on_jump(seconds: float) -> None:
        # Run times are wall-clock: make every step due now, so the schedule restarts from the new time.
        log.warning("daemon.clock_jumped", jump_s=round(seconds, 1))
        for job in scheduler.get_jobs():
            try:
                job.modify(next_run_time=datetime.now(UTC))
            except Exception as e:  # noqa: BLE001 - the scheduler may be shutting down
                log.debug("daemon.reschedule_failed", job=job.id, error=one_line(e))

    clock_watch = JumpWatch(on_jump).start()
    done = threading.Event()
    stopper = threading.Thread(target=_stop_scheduler,
                               args=(worker, scheduler, signals, done, SchedulerNotRunningError),
                               name="batchd-stopper", daemon=True)
    stopper.start()
    if config_path:
        from batchd.reload import watch

        watch(worker, scheduler, config_path, done)
    if not worker.stop.is_set():
        stats = worker.stats()
        log.info("daemon.ready", **(stats or {}))
        notifier.ready(worker.status_line(stats))
        scheduler.start()  # blocks until _stop_scheduler shuts it down
    done.set()
    clock_watch.stop()

    # The scheduler no longer starts steps; wait for the one running to reach a slice boundary.
    if not worker.busy.acquire(timeout=stop_timeout):
        log.error("daemon.stop_timeout", waited_s=stop_timeout)
        _flush_streams()
        os._exit(EXIT_FAILED)
    worker.busy.release()
    if watchdog:
        watchdog.stop()
    if server:
        server.stop()
    log.info("daemon.stopped", signal=_signame(signals.received), exit_status=worker.fatal or EXIT_OK)
    notifier.close()
    signals.restore()
    return worker.fatal or EXIT_OK


def _tick(worker: Worker, step: Callable[[], Outcome]) -> None:
    step()
    if not worker.stop.is_set():
        worker.report()


def _stop_scheduler(worker: Worker, scheduler: Any, signals: Signals, done: threading.Event,
                    not_running: type) -> None:
    worker.stop.wait()
    worker.notifier.stopping("stopping: finishing the current slice")
    log.info("daemon.stopping", signal=_signame(signals.received))
    while not done.is_set():
        try:
            scheduler.shutdown(wait=False)
            return
        except not_running:
            time.sleep(0.05)  # asked to stop before the scheduler started


def run_once(worker: Worker) -> int:
    """``batchd run --once``: recover + flush (forced if anything is pending) + sync. 0, or 1 if a step failed."""
    signals = Signals(worker.stop).install()
    try:
        results = [worker.recover(), worker.flush(force=None), worker.sync()]
        stats = worker.report()
        failed = [name for name, out in zip(("recover", "flush", "sync"), results) if not out.ok]
        flush, sync = results[1].value, results[2].value
        if sync is not None and sync.errors:
            failed.append("sync")
        unsubmitted = flush.deferred if flush is not None else []
        if unsubmitted and not worker.stop.is_set():
            failed.append("submit")
        stopped = any(o.stopped for o in results)
        log.info("daemon.once_done", failed_steps=sorted(set(failed)), unsubmitted_batches=unsubmitted,
                 stopped=stopped, **(stats or {}))
        return worker.fatal or (EXIT_FAILED if failed else EXIT_OK)
    finally:
        worker.notifier.close()
        signals.restore()


def run_until_idle(worker: Worker, poll: float,
                   on_cycle: Callable[[dict[str, Any]], None] | None = None) -> int:
    """``batchd run --until-idle``: flush + sync every ``poll`` seconds until nothing is pending or running.

    0 when idle (or stopped by a signal); 1 when a step failed GIVE_UP_AFTER times in a row.
    """
    signals = Signals(worker.stop).install()
    try:
        worker.recover()
        if worker.stop.is_set():
            log.info("daemon.stopped", signal=_signame(signals.received), exit_status=worker.fatal or EXIT_OK)
            return worker.fatal or EXIT_OK
        done = worker.manager.drain(round=worker.cycle, pause=lambda: not worker.stop.wait(poll),
                                    on_round=on_cycle, give_up=worker.broken)
        if done.idle:
            log.info("daemon.idle", **(done.stats or {}))
            return EXIT_OK
        if done.why == "over_budget":
            log.warning("daemon.idle_over_budget", **(done.stats or {}))  # nothing more may be sent now
            return EXIT_OK
        if done.why == "gave_up":
            broken = [s for s in worker.steps.values() if s.consecutive >= GIVE_UP_AFTER]
            log.error("daemon.gave_up", steps=[s.name for s in broken], errors=[s.last_error for s in broken])
            return EXIT_FAILED
        log.info("daemon.stopped", signal=_signame(signals.received), exit_status=worker.fatal or EXIT_OK)
        return worker.fatal or EXIT_OK
    finally:
        worker.notifier.close()
        signals.restore()


# ---------------------------------------------------------------------------------------------- helpers


def _start_watchdog(worker: Worker) -> Watchdog | None:
    interval = watchdog_interval()
    if not worker.notifier.enabled or interval is None:
        return None
    dog = Watchdog(worker.notifier, worker.health, interval)
    dog.start()
    return dog


def _signame(signum: int | None) -> str | None:
    return signal.Signals(signum).name if signum else None


def _json_event(event: str, level: str, **fields: Any) -> str:
    """One log line built without locks (safe inside a signal handler)."""
    import orjson

    body = {"timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "level": level,
            "event": event, "logger": "batchd.daemon", **fields}
    prefix = "<4>" if fd_is_journal(output_fd()) else ""
    return prefix + orjson.dumps(body).decode()


def _flush_streams() -> None:
    import sys

    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (OSError, ValueError):
            pass


__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "GIVE_UP_AFTER", "MAX_BACKOFF", "STATUS_EVERY", "Outcome", "Signals",
           "StepState", "Worker", "run_once", "run_until_idle", "serve"]
