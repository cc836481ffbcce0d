"""BatchManager: the queue's state machine. Pure orchestration between the store and a backend.

It knows no SQL text and no HTTP. Every method is safe to call again after a crash at any instant:

- flush_queue claims chunks and commits the batch row BEFORE any remote call, then submits;
- recover adopts a job created before a crash (found by its labels) or submits the batch again;
- sync_status applies results in slices, each its own transaction, and finishing a batch twice changes nothing.

How a finished (or failed, cancelled, expired, timed-out) job's output becomes chunk states is in
:mod:`batchd.endings`, a mixin of this class.

The failure policy is written once, as two moves every path uses:

- :meth:`BatchManager._close` ends a batch for good with a status and a reason (its remaining chunks count an
  attempt), counts it in the step's summary and logs it;
- :meth:`BatchManager._defer` leaves a batch for the next cycle with the reason on its row, counts it, and logs
  it — with the traceback when the exception is not an operational error (:func:`batchd.errors.is_expected`).

Exceptions become words in one place (:func:`batchd.errors.one_line`). Shutdown is :class:`Stopped`, a
BaseException that no ``except Exception`` here can swallow. Each step returns a summary (:class:`FlushSummary`,
:class:`SyncSummary`) that the CLI and the daemon read instead of querying the database again.

Time is passed in (``clock``) so tests step ``max_wait`` and ``job_timeout`` without sleeping. Ages are measured
with :class:`~batchd.clock.Ages`: a wall-clock jump while the process runs neither times jobs out nor delays
``max_wait`` (``monotonic`` is the clock that does not jump; an injected ``clock`` serves as both by default).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from batchd.accounting import Accounting
from batchd.backends import (
    Backend,
    BackendError,
    Cleanable,
    JobState,
    PermanentError,
    Stopped,
    content_hash,
)
from batchd.clock import Ages
from batchd.config import Config
from batchd.endings import JobEndings
from batchd.errors import is_expected, one_line
from batchd.faults import crash_point
from batchd.progress import Activity, computes_results
from batchd.store import Busy, Store, parse_iso
from batchd.summary import Drained, FlushSummary, NotSubmitted, SyncSummary

log = structlog.get_logger("batchd.manager")

REPEATED_FAILURES = 3  # the same batch deferred this many times in a row is logged as an error



class BatchManager(JobEndings):
    """The core of batchd: ``BatchManager(store, backend, config)``, usable without the CLI or the daemon."""

    def __init__(self, store: Store, backend: Backend, config: Config, *,
                 clock: Callable[[], float] = time.time, progress: Callable[[], None] | None = None,
                 monotonic: Callable[[], float] | None = None):
        self.store = store
        self.backend = backend
        self.config = config
        self.clock = clock
        self.ages = Ages(clock, monotonic or (time.monotonic if clock is time.time else clock))
        # Called at every slice boundary: feeds the watchdog, and raises Stopped when shutdown was asked.
        self.progress = progress or (lambda: None)
        # Called with the current Activity while results are read (the daemon's STATUS=, a terminal's bar).
        self.on_activity: Callable[[Activity], None] | None = None
        self._deferred: dict[int, int] = {}  # batch id -> times in a row it was deferred
        emb = config.embedding
        self._model, self._task, self._dims = emb.model, emb.task_type, emb.dimensions
        # Remote calls that failed, by call (submit, find_job, status, results, cancel): process-lifetime counts
        # for the metrics (batchd_remote_errors_total{kind}).
        self.remote_errors: Counter[str] = Counter()
        # Money and size: what each batch may hold and cost, what it sent and what it was billed.
        self.accounting = Accounting(store, config, clock)

    # ------------------------------------------------------------------ helpers

    def hash_text(self, text: str) -> str:
        return content_hash(text, self._model, self._task, self._dims)

    def enqueue(self, rows, on_slice=None, on_refused=None):  # type: ignore[no-untyped-def]
        """Add texts to the queue: ``rows`` yields (id or None, text). See Store.enqueue."""
        return self.store.enqueue(rows, self.hash_text, self.clock(), on_slice=on_slice, on_refused=on_refused)

    def get_queue_stats(self) -> dict[str, Any]:
        """{"pending", "running", "ready", "failed", "batches": {status: n}}."""
        return self.store.queue_stats()

    def prepare(self) -> None:
        """Housekeeping before claiming: drop vectors of rewritten/deleted chunks, hash new rows, fail empty
        ones, and copy vectors that already exist for the same text (never pay twice)."""
        now = self.clock()
        purged = self.store.purge_tombstones()
        hashed, empty = self.store.prepare_pending(self.hash_text, now)
        copied = self.store.copy_known_vectors(now)
        too_long = self.accounting.fail_too_long()
        if purged or empty or copied or too_long:
            log.info("queue.prepared", vectors_removed=purged, hashed=hashed, failed_empty=empty,
                     copied_locally=copied, failed_too_long=too_long)

    # ------------------------------------------------------------------ flush

    def should_flush(self) -> bool:
        """True when pending >= min_batch_size, or the oldest pending chunk is older than max_wait."""
        q = self.config.queue
        pending, oldest = self.store.pending_summary()
        if pending <= 0:
            return False
        if pending >= q.min_batch_size:
            return True
        oldest_ts = parse_iso(oldest)
        return oldest_ts is not None and self.ages.age("oldest_pending", oldest_ts) >= q.max_wait

    def flush_queue(self, min_size: int | None = None, force: bool = False,
                    ignore_budget: bool = False) -> FlushSummary:
        """Recover earlier batches, then claim pending chunks into batches and submit them.

        Below the threshold (``min_size`` or ``queue.min_batch_size``, or ``max_wait``) and not ``force``:
        claims nothing. Splits at ``max_batch_size``, ``queue.max_batch_characters`` and the model's input
        bytes; never has more than ``max_running_jobs`` batches in flight. With a ``[budget]``, a batch is only
        submitted if its estimated cost fits what is left today and this month (fewer chunks are claimed to
        fit); otherwise the chunks stay pending, ``flush.over_budget`` is logged and the summary says so
        (``over_budget``; not an error). ``force`` does not bypass the budget; ``ignore_budget`` does, and logs
        that it did. A submit that fails transiently leaves the batch PENDING for :meth:`recover`; a permanent
        failure closes the batch FAILED and counts an attempt on its chunks. Shutdown (``progress`` raising
        Stopped) ends the flush with ``stopped`` set. Raises Busy when another process holds the worker lock.
        """
        summary = FlushSummary()
        with self.store.worker_lock():
            try:
                self._flush_queue(min_size, force, summary, ignore_budget)
            except Stopped:
                summary.stopped = True
                log.info("flush.stopped", created=len(summary.created), submitted=len(summary.submitted))
        return summary

    def _flush_queue(self, min_size: int | None, force: bool, summary: FlushSummary,
                     ignore_budget: bool = False) -> None:
        q = self.config.queue
        self.accounting.declined = False
        self._recover(summary)
        self.prepare()
        pending, _ = self.store.pending_summary()
        threshold = q.min_batch_size if min_size is None else min_size
        if not force and pending < threshold and not self.should_flush():
            log.debug("flush.below_threshold", pending=pending, min_batch_size=threshold)
            return
        if ignore_budget and self.config.budget.daily_usd + self.config.budget.monthly_usd > 0:
            log.warning("flush.budget_ignored", daily_usd=self.config.budget.daily_usd,
                        monthly_usd=self.config.budget.monthly_usd)
        while self.store.count_active_batches() < q.max_running_jobs:
            size, estimated = self.accounting.next_batch(ignore_budget, pending)
            if size == 0:
                break
            claimed = self.store.claim_batch(size, self._model, self.clock())
            if claimed is None:
                break
            if estimated is not None:
                self.store.set_estimate(claimed[0], estimated)  # spent from now on, for the next batch's budget
            batch_id, n = claimed
            crash_point("claim.committed")
            summary.created.append(batch_id)
            log.info("batch.claimed", batch_id=batch_id, google_job_id=None, chunks=n)
            if self._submit(batch_id, summary) is None:
                break  # the service is refusing or failing: try again next cycle, not in a tight loop
            self.progress()
            pending, _ = self.store.pending_summary()
            if pending <= 0 or (not force and pending < threshold and not self.should_flush()):
                break
        if not summary.created and pending and self.store.count_active_batches() >= q.max_running_jobs:
            log.info("flush.at_capacity", pending=pending, max_running_jobs=q.max_running_jobs)
        budget = self.accounting.budget
        if budget is not None and budget.limited:
            summary.over_budget = self.accounting.declined
            summary.budget = budget.describe()

    def _submit(self, batch_id: int, summary: FlushSummary) -> str | None:
        """Submit a claimed batch. The batch row was committed before this call (rule 1)."""
        if self.store.batch_chunk_count(batch_id) == 0:
            self._close(summary, batch_id, None, "COMPLETED", "batch.empty", reason=_EMPTY)
            return None
        started = time.monotonic()
        counted: dict[str, Any] = {}
        try:
            job = self.backend.submit(batch_id, self.accounting.counting(self.store.batch_items(batch_id), counted),
                                      progress=self.progress)
        except PermanentError as e:
            self.remote_errors["submit"] += 1
            self._close(summary, batch_id, None, "FAILED", "batch.submit_failed", reason=f"submit rejected: {e}",
                        error=str(e), permanent=True)
            return None
        except Exception as e:  # noqa: BLE001 - transient (or a bug, logged with its traceback): recover() retries
            self._defer(summary, batch_id, None, "submit failed", e, "batch.submit_retry")
            return None
        crash_point("submit.created")
        if not self.store.mark_submitted(batch_id, job, self.clock()):
            # Closed while its job was being created (an operator's cancel): the job must not run on, paid for
            # texts that are queued again.
            self._cancel_remote(batch_id, job)
            log.warning("batch.closed_during_submit", batch_id=batch_id, google_job_id=job)
            return None
        self.accounting.sent(batch_id, counted)
        summary.note_submitted(batch_id)
        log.info("batch.submitted", batch_id=batch_id, google_job_id=job,
                 chunks=self.store.batch_chunk_count(batch_id),
                 duration_ms=round((time.monotonic() - started) * 1000))
        return job

    # ------------------------------------------------------------------ recover

    def recover(self) -> int:
        """Give every batch left PENDING without a job name exactly one remote job.

        Asks the backend for a job labelled with the batch (a create whose response was lost, or a crash
        between create and commit): adopts it if found, submits otherwise. Returns batches handled.
        Stopped propagates (the batches not reached are handled next time).
        """
        with self.store.worker_lock():
            return self._recover(FlushSummary())

    def _recover(self, summary: FlushSummary) -> int:
        handled = 0
        for b in self.store.batches(["PENDING"]):
            if b.google_job_id:
                continue
            try:
                found = self.backend.find_job(b.id)
            except Exception as e:  # noqa: BLE001 - try again at the next cycle
                self._defer(summary, b.id, None, "recovery lookup failed", e, "batch.recover_failed")
                continue
            crash_point("recover.found")
            if found:
                if self.store.mark_submitted(b.id, found, self.clock()):
                    self.accounting.adopted(b.id)  # sent before the crash: count what it holds
                    summary.note_submitted(b.id)
                    log.info("batch.adopted", batch_id=b.id, google_job_id=found)
                else:
                    self._cancel_remote(b.id, found)
            else:
                log.info("batch.resubmit", batch_id=b.id, google_job_id=None)
                self._submit(b.id, summary)
            handled += 1
            self.progress()
        return handled

    # ------------------------------------------------------------------ sync

    def sync_status(self) -> SyncSummary:
        """Poll every RUNNING batch; apply finished ones; cancel those past job_timeout.

        Idempotent and resumable: a second call right after changes nothing; a call interrupted by
        shutdown (``progress`` raised Stopped) leaves whole slices applied and the rest for next time.
        """
        summary = SyncSummary()
        with self.store.worker_lock():
            self.store.wipe_spools()
            self.store.purge_tombstones()
            try:
                running = self.store.batches(["RUNNING"])
                self.ages.keep_only([("batch", b.id) for b in running], "batch")
                for b in running:
                    self._sync_one(b, summary)
                    self.progress()
            except Stopped:
                summary.stopped = True
                log.info("sync.stopped", applied=summary.applied)
        return summary

    def _sync_one(self, b: Any, summary: SyncSummary) -> None:
        job = b.google_job_id
        try:
            info = self.backend.status(job)
        except PermanentError as e:
            # The job is gone (deleted remotely, or a name the service no longer knows): waiting until
            # job_timeout would only delay the retry of its chunks.
            self.remote_errors["status"] += 1
            self._close(summary, b.id, job, "FAILED", "job.lost", reason=f"remote job lost: {e}", error=str(e))
            return
        except Exception as e:  # noqa: BLE001 - one batch's trouble must not stop the others
            self._defer(summary, b.id, job, "status check failed", e, "job.status_failed")
            return
        summary.checked += 1
        # A backend that computes while its results are read (local) says SUCCEEDED before any work is done:
        # its job.state event waits until the results are in (endings.py).
        if info.state.value != b.remote_state or info.output:
            self.store.set_remote_state(b.id, info.state.value, self.clock(), info.output)
            if info.state.value != b.remote_state and not (info.state.has_results and computes_results(self.backend)):
                log.info("job.state", batch_id=b.id, google_job_id=job, state=info.state.value)

        if not info.state.terminal:  # PAUSED and UPDATING too: keep polling, bounded by job_timeout
            if self._timed_out(b):
                self._time_out(b, info, summary)
            return
        self._finish_job(b, info, summary)

    def _cleanup(self, batch_id: int, job: str) -> None:
        if not isinstance(self.backend, Cleanable):
            return
        try:
            self.backend.cleanup(batch_id, job)
        except Exception as e:  # staged files are only money, never correctness
            log.warning("batch.cleanup_failed", batch_id=batch_id, google_job_id=job, error=one_line(e),
                        exc_info=not is_expected(e))

    def _cancel_remote(self, batch_id: int, job: str) -> None:
        try:
            self.backend.cancel(job)
        except Exception as e:  # cancel is best effort
            self.remote_errors["cancel"] += 1
            log.warning("job.cancel_failed", batch_id=batch_id, google_job_id=job, error=one_line(e),
                        exc_info=not is_expected(e))

    # ------------------------------------------------------------------ the failure policy: two moves

    def _close(self, summary: SyncSummary | FlushSummary, batch_id: int, job: str | None, status: str,
               event: str, *, reason: str | None = None, chunks_key: str = "chunks", **fields: Any) -> None:
        """Close a batch for good with ``status`` (COMPLETED or FAILED) and ``reason``: every chunk it still
        holds counts one attempt (``max_attempts`` reached: FAILED). Counted in ``summary``, logged once
        (``event``: info when COMPLETED, error when FAILED)."""
        self._deferred.pop(batch_id, None)
        n, failed = self.store.finish_batch(batch_id, self.config.queue.max_attempts, self.clock(), status=status,
                                            error=reason)
        self.accounting.closed(batch_id)  # priced at the figure in force now (the cost ledger)
        summary.note_closed(batch_id, status, reason, n, failed)
        emit = log.info if status == "COMPLETED" else log.error
        if reason is not None:
            fields["reason"] = reason
        emit(event, batch_id=batch_id, google_job_id=job, **{chunks_key: n}, chunks_failed=failed, **fields)

    def _defer(self, summary: SyncSummary | FlushSummary, batch_id: int, job: str | None, what: str,
               e: Exception, event: str, **fields: Any) -> None:
        """Leave a batch as it is for the next cycle, with ``what`` failed and why on the batch row. The
        traceback goes to the log when ``e`` is not an operational error: a bug in a backend must not hide
        behind an endless "will retry". The same batch deferred REPEATED_FAILURES times in a row is logged as
        an error (journal priority err, with the traceback once): it is not going away by itself."""
        error = one_line(e)
        self.remote_errors[_REMOTE_CALL.get(event, "other")] += 1
        reason = f"{what}, will retry: {error}"
        self.store.note_batch_error(batch_id, reason, self.clock())
        summary.note_deferred(batch_id, reason, error)
        n = self._deferred[batch_id] = self._deferred.get(batch_id, 0) + 1
        emit = log.error if n >= REPEATED_FAILURES else log.warning
        emit(event, batch_id=batch_id, google_job_id=job, error=error, consecutive_failures=n,
             exc_info=n == REPEATED_FAILURES or not is_expected(e), **fields)

    # ------------------------------------------------------------------ draining

    def drain(self, *, round: Callable[[], dict[str, Any] | None] | None = None,
              pause: Callable[[], bool] | None = None, on_round: Callable[[dict[str, Any]], None] | None = None,
              give_up: Callable[[], str | None] | None = None, stall_rounds: int | None = None) -> Drained:
        """Flush and sync, round after round, until nothing is pending or running.

        ``round`` is one flush + sync returning the queue stats (default :meth:`flush_and_sync`; the daemon
        passes its guarded steps, which return None when the counts could not be read). Between rounds
        ``pause()`` waits and returns False to stop (default: no wait). Ends "idle"; "stalled" after
        ``stall_rounds`` rounds in a row that changed no count; "gave_up" when ``give_up()`` names a reason;
        "stopped" when ``pause()`` says so or a round raised Stopped.
        """
        run = round or self.flush_and_sync
        rounds, stalled, before, stats = 0, 0, None, None
        while True:
            try:
                stats = run()
            except Stopped:
                return Drained("stopped", rounds, stats)
            rounds += 1
            if stats is not None:
                if on_round:
                    on_round(stats)
                if stats["pending"] == 0 and stats["running"] == 0:
                    return Drained("idle", rounds, stats)
                if stats["running"] == 0 and self.accounting.declined:
                    return Drained("over_budget", rounds, stats)  # nothing more may be sent: waiting is useless
                counts = tuple(stats.get(k) for k in ("pending", "running", "ready", "failed"))
                stalled = stalled + 1 if counts == before else 0
                before = counts
                if stall_rounds is not None and stalled >= stall_rounds:
                    return Drained("stalled", rounds, stats)
            reason = give_up() if give_up else None
            if reason:
                return Drained("gave_up", rounds, stats, reason)
            if pause is not None and not pause():
                return Drained("stopped", rounds, stats)

    def flush_and_sync(self) -> dict[str, Any]:
        """One round: flush (forced while anything is pending), then sync; returns the queue stats."""
        self.flush_queue(force=self.store.pending_summary()[0] > 0)
        self.sync_status()
        return self.get_queue_stats()

    # ------------------------------------------------------------------ operator actions

    def cancel(self, batch_id: int) -> bool:
        """Cancel a batch: its remote job cancelled, its chunks back to PENDING without counting an attempt.

        Safe against a step running at the same time in another process (issue 9, item 5):

        - A batch with a job name: the job is cancelled first; if that call fails (other than "no such job"),
          BackendError is raised and nothing changed — releasing the chunks of a job that still runs would pay
          for them twice. The batch is then closed only if it is still in flight: a sync that finished it first
          wins, and cancel returns False. A sync that finishes after the cancel leaves the batch FAILED.
        - A batch without a job name may be in the middle of its submit or its recovery: the cancel takes the
          worker lock (raises :class:`~batchd.store.Busy` while a step runs), cancels a job created before a
          crash if the backend finds one, then closes the batch.

        Returns False when the batch does not exist or is already final.
        """
        b = self.store.batch(batch_id)
        if b is None or b.status not in ("PENDING", "RUNNING"):
            return False
        if b.google_job_id:
            return self._cancel(batch_id, b.google_job_id)
        with self.store.worker_lock():
            b = self.store.batch(batch_id)
            if b is None or b.status not in ("PENDING", "RUNNING"):
                return False
            job = b.google_job_id
            if not job:
                try:
                    job = self.backend.find_job(batch_id)
                except BackendError:
                    raise
                except Exception as e:  # noqa: BLE001 - one line for the operator, nothing changed
                    raise BackendError(one_line(e)) from None
            return self._cancel(batch_id, job)

    def _cancel(self, batch_id: int, job: str | None) -> bool:
        if job:
            try:
                self.backend.cancel(job)
            except PermanentError as e:  # the job is gone: nothing left to stop
                log.warning("job.cancel_failed", batch_id=batch_id, google_job_id=job, error=one_line(e))
            except BackendError:
                raise
            except Exception as e:  # noqa: BLE001 - one line for the operator, nothing changed
                raise BackendError(one_line(e)) from None
            else:
                # The rows the cancelled job exported are paid for: apply them before the rest goes back. Only
                # under the worker lock (the spool is one per batch); while a step runs, the cancel still wins
                # and the export is skipped (logged): those texts may then be paid for again.
                try:
                    with self.store.worker_lock():
                        self._apply_cancelled_export(batch_id, job)
                except Busy as e:
                    log.warning("job.cancel_export_skipped", batch_id=batch_id, google_job_id=job, error=one_line(e))
        n = self.store.cancel_batch_locally(batch_id, "batch cancelled by operator", self.clock())
        if n is None:
            log.info("batch.cancel_too_late", batch_id=batch_id, google_job_id=job)
            return False
        self.accounting.closed(batch_id)
        log.info("batch.cancelled", batch_id=batch_id, google_job_id=job, chunks=n)
        return True

    def retry_failed(self) -> int:
        """Put every FAILED chunk back in the queue with its attempts reset; returns how many."""
        n = self.store.retry_failed(self.clock())
        log.info("chunks.retried", chunks=n)
        return n


_EMPTY = "every chunk changed or was deleted before submit"
# The remote call behind each deferral event (batchd_remote_errors_total{kind}).
_REMOTE_CALL = {"batch.submit_retry": "submit", "batch.recover_failed": "find_job", "job.status_failed": "status",
                "job.results_failed": "results"}


__all__ = ["BackendError", "BatchManager", "Drained", "FlushSummary", "JobState", "NotSubmitted", "SyncSummary"]
