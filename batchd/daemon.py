"""The long-running worker: APScheduler wiring, signals and the watchdog. No queue logic of its own.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from batchd.backends import Stopped
from batchd.clock import JumpWatch
from batchd.errors import is_expected, one_line
from batchd.logs import fd_is_journal, output_fd
from batchd.progress import Activity
from batchd.store import Busy, SchemaMismatch, describe_problem, explain
from batchd.systemd import Health, Notifier, Watchdog, watchdog_interval

log = structlog.get_logger("batchd.daemon")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 78  # the config no longer fits the database: the unit's RestartPreventExitStatus=78
MAX_BACKOFF = 600.0  # seconds; a failing step is retried at least this often
GIVE_UP_AFTER = 5  # --until-idle: consecutive failures of one step before exiting non-zero
STOP_TIMEOUT = 60.0  # seconds to wait for the running step after SIGTERM (below the unit's TimeoutStopSec)
STATUS_EVERY = 2.0  # seconds between two STATUS= progress updates while results are read


# ---------------------------------------------------------------------------------------------- steps


@dataclass
class StepState:
    """Failure bookkeeping for one step (flush, sync, recover): consecutive errors and backoff."""

    name: str
    interval: float
    consecutive: int = 0
    failures: int = 0
    first_failure: float | None = None
    retry_at: float = 0.0
    last_error: str = ""
    troubled_in_row: int = 0
    last_trouble: str = ""
    last_ok: float | None = None  # worker clock: the last success (or skip because another process was busy)
    last_ok_at: float | None = None  # the same, Unix time (for batchd_last_success_timestamp_seconds)
    problem: str = ""  # why the last run was not a success though it did not raise (a sync's remote errors)

    def failed(self, now: float, error: str) -> float:
        """Record a failure; return the backoff (seconds) before the step runs again."""
        self.consecutive += 1
        self.failures += 1
        self.last_error = error
        if self.first_failure is None:
            self.first_failure = now
        # 1st failure: retried at the next tick; then 1, 3, 7, ... extra intervals, capped.
        delay = min(self.interval * (2 ** (self.consecutive - 1) - 1), max(MAX_BACKOFF, self.interval))
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.consecutive, self.first_failure, self.retry_at, self.last_error = 0, None, 0.0, ""

    def ok_now(self, now: float) -> None:
        self.last_ok, self.last_ok_at, self.problem = now, time.time(), ""

    def troubled(self, errors: list[str]) -> None:
        """The step ran, but some of its work failed (a batch whose results could not be read)."""
        self.troubled_in_row += 1
        self.last_trouble = errors[0] if len(errors) == 1 else f"{errors[0]} (+{len(errors) - 1} more)"

    def untroubled(self) -> None:
        self.troubled_in_row, self.last_trouble = 0, ""


@dataclass
class Outcome:
    ok: bool = True
    stopped: bool = False
    skipped: bool = False
    value: Any = None
    duration_ms: int = 0


@dataclass
class LastResults:
    """What the STATUS= line reports besides the counts."""

    sync_at: float | None = None
    applied: int = 0  # by the last sync
    applied_at: float | None = None  # the last sync that applied anything...
    applied_then: int = 0  # ...and how many
    flush_at: float | None = None
    submitted: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class Worker:
    """Runs the manager's steps through one wrapper that catches, logs, counts, backs off and logs recovery.

    It installs itself as the manager's ``progress`` hook: every slice boundary feeds the watchdog and
    raises :class:`Stopped` once :attr:`stop` is set.
    """

    def __init__(self, manager: Any, *, notifier: Notifier | None = None, health: Health | None = None,
                 stop: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
                 metrics: Any = None):
        self.manager = manager
        self.metrics = metrics  # batchd.metrics.Metrics, refreshed after every step (None: no metrics)
        self.notifier = notifier or Notifier({})
        self.health = health or Health()
        self.stop = stop or threading.Event()
        self.clock = clock
        q = manager.config.queue
        self.steps = {
            "recover": StepState("recover", float(q.flush_interval)),
            "flush": StepState("flush", float(q.flush_interval)),
            "sync": StepState("sync", float(q.sync_interval)),
        }
        self.last = LastResults()
        self.busy = threading.Lock()  # held while a step runs; shutdown waits on it
        self.reload = threading.Event()  # set by SIGHUP (serve only)
        self.activity: Activity | None = None  # what the running step is reading right now
        self.on_activity: Callable[[Activity], None] | None = None  # e.g. a terminal's progress bar
        self._status_sent = 0.0
        self.last_stats: dict[str, Any] | None = None  # the counts of the last report()
        self.fatal: int | None = None  # exit status when a step found that the worker must not go on
        self.started = clock()
        manager.progress = self.progress
        manager.on_activity = self._activity

    # ------------------------------------------------------------------ hooks

    def progress(self) -> None:
        """The manager's slice-boundary hook: record progress for the watchdog; abandon the step on shutdown."""
        self.health.progress()
        if self.stop.is_set():
            raise Stopped()

    def _activity(self, act: Activity) -> None:
        """The manager reports a long read: STATUS= at most every STATUS_EVERY seconds, and the bar, if any."""
        self.activity = act
        if self.on_activity is not None:
            self.on_activity(act)
        now = time.monotonic()
        if now - self._status_sent >= STATUS_EVERY:
            self._status_sent = now
            self.notifier.status(self.status_line())

    # ------------------------------------------------------------------ steps

    def recover(self) -> Outcome:
        return self._step("recover", self.manager.recover)

    def flush(self, force: bool | None = False) -> Outcome:
        """Submit batches when the queue is due (min_batch_size / max_wait), or always when ``force``.

        ``force=None`` forces only when something is pending (``--once`` and ``--until-idle``).
        """
        def flush() -> Any:
            f = force
            if f is None:
                f = self.manager.get_queue_stats()["pending"] > 0
            return self.manager.flush_queue(force=f)

        out = self._step("flush", flush)
        if out.ok and not out.skipped and out.value is not None:
            summary = out.value
            self.last.flush_at, self.last.submitted = time.time(), len(summary.submitted)
            out.stopped = out.stopped or summary.stopped
            if summary.created or summary.not_submitted:
                log.info("flush.done", duration_ms=out.duration_ms, **summary.as_dict())
        return out

    def sync(self) -> Outcome:
        # A sync in which a batch's remote call failed returned normally but did not succeed (health, metrics).
        out = self._step("sync", self.manager.sync_status,
                         judge=lambda s: "; ".join(s.errors)[:300] if not s.ok else "")
        if out.ok and not out.skipped and out.value is not None:
            summary = out.value
            self.last.sync_at, self.last.applied = time.time(), summary.applied
            if summary.applied:
                self.last.applied_at, self.last.applied_then = self.last.sync_at, summary.applied
            out.stopped = out.stopped or summary.stopped
            if summary.checked or summary.finished or summary.errors:
                log.info("sync.done", duration_ms=out.duration_ms, **summary.as_dict())
            if summary.errors:
                self.steps["sync"].troubled(summary.errors)
            elif not summary.stopped:
                self.steps["sync"].untroubled()
        return out

    def _step(self, name: str, fn: Callable[[], Any], judge: Callable[[Any], str] | None = None) -> Outcome:
        started = time.monotonic()
        out = self._run_step(name, fn, judge)
        if self.metrics is not None:  # on this thread (the database's); a failure here never fails the step
            self.metrics.after_step(self, name, None if out.skipped else time.monotonic() - started)
        return out

    def _run_step(self, name: str, fn: Callable[[], Any], judge: Callable[[Any], str] | None) -> Outcome:
        state = self.steps[name]
        if self.stop.is_set():
            return Outcome(skipped=True, stopped=True)
        now = self.clock()
        if now < state.retry_at:
            log.debug("daemon.step_backoff", step=name, retry_in_s=round(state.retry_at - now, 1))
            return Outcome(skipped=True)
        with self.busy:
            self.health.begin(name)
            started = time.monotonic()
            try:
                value = fn()
            except Stopped:
                log.info("daemon.step_stopped", step=name)
                return Outcome(stopped=True)
            except SchemaMismatch as e:
                # Someone changed the database under this worker (reset-vectors or uninstall with another
                # config): retrying cannot help. Stop with EX_CONFIG so systemd does not restart-loop.
                log.error("config.invalid", step=name, error=f"{e.key}: {e}", key=e.key, exit_status=EXIT_CONFIG,
                          **e.fields)
                self.fatal = EXIT_CONFIG
                self.stop.set()
                return Outcome(ok=False, stopped=True)
            except Busy as e:
                # Another batchd process (a hand-run `batchd sync`, a timer) holds the worker lock: not a
                # failure of this one, so no backoff; the next tick tries again.
                log.warning("daemon.step_busy", step=name, reason=str(e))
                state.ok_now(self.clock())  # not this worker's failure: healthy (see batchd.metrics)
                return Outcome(ok=False, skipped=True)
            except Exception as e:  # the one place a failing step is caught
                database = self.manager.config.database.path
                problem = explain(e, database)
                if isinstance(problem, Busy):
                    # The application held the database's write lock past the busy timeout: not a failure of
                    # batchd either; the next tick tries again.
                    log.warning("daemon.step_busy", step=name, reason=str(problem))
                    state.ok_now(self.clock())  # skipped because busy: healthy
                    return Outcome(ok=False, skipped=True)
                # A known state of the database file (disk full, damaged) is said as such, in one line and without
                # a traceback; everything else keeps its traceback (a bug must be diagnosable).
                error = describe_problem(e, database)
                delay = state.failed(self.clock(), error)
                log.error("daemon.step_failed", step=name, error=error,
                          consecutive_failures=state.consecutive, failures_total=state.failures,
                          retry_in_s=round(max(delay, state.interval), 1),
                          exc_info=problem is None and not is_expected(e))
                return Outcome(ok=False)
            finally:
                self.health.end()
                self.activity = None
            duration_ms = round((time.monotonic() - started) * 1000)
        if state.consecutive:
            since = state.first_failure if state.first_failure is not None else self.clock()
            log.info("daemon.step_recovered", step=name, after_failures=state.consecutive,
                     down_s=round(self.clock() - since, 1))
        state.succeeded()
        problem = judge(value) if judge is not None else ""
        if problem:
            state.problem = problem
        else:
            state.ok_now(self.clock())
        log.debug("daemon.step_done", step=name, duration_ms=duration_ms)
        return Outcome(value=value, duration_ms=duration_ms)

    def healthy(self) -> tuple[bool, str]:
        """(True, "") while flush and sync last succeeded recently enough; else (False, why). See batchd.metrics."""
        from batchd.metrics import health

        return health(self)

    def cycle(self) -> dict[str, Any] | None:
        """One round of ``--until-idle``: flush (forced if anything is pending) + sync, then STATUS=; the
        counts, or None when they could not be read. Skipped (stats None) once shutdown was asked."""
        if self.stop.is_set():
            return None
        self.flush(force=None)
        self.sync()
        return self.report()

    def broken(self) -> str | None:
        """The steps that failed GIVE_UP_AFTER times in a row, as one line; None while all is well."""
        broken = [s for s in self.steps.values() if s.consecutive >= GIVE_UP_AFTER]
        return "; ".join(f"{s.name}: {s.last_error}" for s in broken) or None

    # ------------------------------------------------------------------ status

    def stats(self) -> dict[str, Any] | None:
        try:
            return dict(self.manager.get_queue_stats())
        except Exception as e:  # a status line is not worth failing for
            log.warning("daemon.stats_failed", error=one_line(e), exc_info=not is_expected(e))
            return None

    def status_line(self, stats: dict[str, Any] | None = None) -> str:
        """The one STATUS= text, composed here (add new parts here too), e.g.
        ``embedding batch 3: 1,200/3,000 (45/s); pending=150 running=3000 ready=12000 failed=5; last sync ...``
        or ``...; sync failing (4x): batch 3: RuntimeError: could not create a primitive``."""
        stats = stats if stats is not None else self.stats()
        parts = []
        if self.activity is not None:
            parts.append(self.activity.text())
        if stats is not None:
            parts.append(" ".join(f"{k}={stats.get(k, 0)}" for k in ("pending", "running", "ready", "failed")))
        if self.last.sync_at is not None:
            parts.append(f"last sync {_hms(self.last.sync_at)} applied {self.last.applied}")
            if not self.last.applied and self.last.applied_at is not None:
                parts[-1] += f" (before: {self.last.applied_then} at {_hms(self.last.applied_at)})"
        if self.last.flush_at is not None and self.last.submitted:
            parts.append(f"last flush {_hms(self.last.flush_at)} submitted {self.last.submitted} batches")
        for st in self.steps.values():
            if st.consecutive:
                parts.append(f"{st.name} failing ({st.consecutive}x): {st.last_error}"[:160])
            elif st.troubled_in_row:
                parts.append(f"{st.name} failing ({st.troubled_in_row}x): {st.last_trouble}"[:160])
        spend = self._spend()
        if spend:
            parts.append(spend)
        return "; ".join(parts) or "starting"

    def _spend(self) -> str:
        from batchd.cost import status_text

        try:
            return status_text(self.manager.store, self.manager.config, self.manager.clock())
        except Exception as e:  # noqa: BLE001 - a status line is not worth failing for
            log.warning("daemon.stats_failed", error=one_line(e))
            return ""

    def report(self) -> dict[str, Any] | None:
        """Send STATUS= with the counts and last results; return the counts."""
        stats = self.stats()
        self.last_stats = stats
        self.notifier.status(self.status_line(stats))
        return stats


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


def _hms(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


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


__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "Signals", "Worker", "run_once", "run_until_idle", "serve"]
