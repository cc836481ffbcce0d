"""The worker: one BatchManager stepped by the daemon — recover, flush and sync as steps with backoff, the
STATUS= line, health and progress. Every failing step is caught here, once (:meth:`Worker._run_step`): it is
counted, logged with a constant event name, backed off, and its recovery logged; a busy database or another
batchd holding the worker lock is a skipped tick, not a failure. No scheduling and no signals (daemon.py).

Time is passed in (``clock``), so tests step the worker in-process without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from batchd.backends import Stopped
from batchd.errors import is_expected, one_line
from batchd.progress import Activity
from batchd.store import Busy, SchemaMismatch, describe_problem, explain
from batchd.systemd import Health, Notifier

log = structlog.get_logger("batchd.daemon")

EXIT_CONFIG = 78  # the config no longer fits the database: the unit's RestartPreventExitStatus=78
GIVE_UP_AFTER = 5  # --until-idle: consecutive failures of one step before exiting non-zero
MAX_BACKOFF = 600.0  # seconds; a failing step is retried at least this often
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
                 metrics: Any = None, reload: threading.Event | None = None):
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
        # Set by SIGHUP (serve only; one that came while start-up waited for the database is already set).
        self.reload = reload or threading.Event()
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


def _hms(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))
