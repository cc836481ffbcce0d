"""BatchManager: the queue's state machine. Pure orchestration between the store and a backend.

It knows no SQL text and no HTTP. Every method is safe to call again after a crash at any instant:

- flush_queue claims chunks and commits the batch row BEFORE any remote call, then submits;
- recover adopts a job created before a crash (found by its labels) or submits the batch again;
- sync_status applies results in slices, each its own transaction, and finishing a batch twice changes nothing.

Time is passed in (``clock``) so tests step ``max_wait`` and ``job_timeout`` without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from batchd.backends import (
    Backend,
    BackendError,
    Cleanable,
    JobState,
    PermanentError,
    ResultLine,
    Stopped,
    content_hash,
)
from batchd.config import Config
from batchd.store import Store, parse_iso

log = structlog.get_logger("batchd.manager")

RESULT_SLICE = 2_000  # lines parsed per spool transaction
SPOOL_MAX_BYTES = 1 << 30  # a bigger job (1M rows x 3,072 dims is ~12 GB) is spooled and applied in rounds


@dataclass
class SyncSummary:
    checked: int = 0  # batches whose remote state was read
    finished: int = 0  # batches closed (COMPLETED or FAILED)
    applied: int = 0  # chunks that became READY
    errored: int = 0  # chunks sent back (or FAILED) because their line or job failed
    failed: int = 0  # chunks that reached max_attempts
    stopped: bool = False  # shutdown interrupted the sync at a slice boundary
    errors: list[str] = field(default_factory=list)  # batches whose remote call failed this time

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "finished": self.finished, "applied": self.applied,
                "errored": self.errored, "failed": self.failed, "stopped": self.stopped,
                "errors": list(self.errors)}


class BatchManager:
    """The core of batchd: ``BatchManager(store, backend, config)``, usable without the CLI or the daemon."""

    def __init__(self, store: Store, backend: Backend, config: Config, *,
                 clock: Callable[[], float] = time.time, progress: Callable[[], None] | None = None):
        self.store = store
        self.backend = backend
        self.config = config
        self.clock = clock
        # Called at every slice boundary: feeds the watchdog, and raises Stopped when shutdown was asked.
        self.progress = progress or (lambda: None)
        emb = config.embedding
        self._model, self._task, self._dims = emb.model, emb.task_type, emb.dimensions

    # ------------------------------------------------------------------ helpers

    def hash_text(self, text: str) -> str:
        return content_hash(text, self._model, self._task, self._dims)

    def enqueue(self, rows, on_slice=None):  # type: ignore[no-untyped-def]
        """Add texts to the queue: ``rows`` yields (id or None, text). See Store.enqueue."""
        return self.store.enqueue(rows, self.hash_text, self.clock(), on_slice=on_slice)

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
        if purged or empty or copied:
            log.info("queue.prepared", vectors_removed=purged, hashed=hashed, failed_empty=empty,
                     copied_locally=copied)

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
        return oldest_ts is not None and self.clock() - oldest_ts >= q.max_wait

    def flush_queue(self, min_size: int | None = None, force: bool = False) -> list[int]:
        """Claim pending chunks into batches and submit them; return the new local batch ids.

        Below the threshold (``min_size`` or ``queue.min_batch_size``, or ``max_wait``) and not ``force``:
        returns []. Splits at ``max_batch_size``; never has more than ``max_running_jobs`` batches in flight.
        A submit that fails transiently leaves the batch PENDING for :meth:`recover`; a permanent failure
        marks the batch FAILED and counts an attempt on its chunks.
        """
        with self.store.worker_lock():
            return self._flush_queue(min_size, force)

    def _flush_queue(self, min_size: int | None, force: bool) -> list[int]:
        q = self.config.queue
        self.recover()
        self.prepare()
        pending, _ = self.store.pending_summary()
        threshold = q.min_batch_size if min_size is None else min_size
        if not force and pending < threshold and not self.should_flush():
            log.debug("flush.below_threshold", pending=pending, min_batch_size=threshold)
            return []
        created: list[int] = []
        while self.store.count_active_batches() < q.max_running_jobs:
            claimed = self.store.claim_batch(q.max_batch_size, self._model, self.clock())
            if claimed is None:
                break
            batch_id, n = claimed
            created.append(batch_id)
            log.info("batch.claimed", batch_id=batch_id, google_job_id=None, chunks=n)
            if self._submit(batch_id) is None:
                break  # the service is refusing or failing: try again next cycle, not in a tight loop
            self.progress()
            pending, _ = self.store.pending_summary()
            if pending <= 0 or (not force and pending < threshold and not self.should_flush()):
                break
        if not created and pending and self.store.count_active_batches() >= q.max_running_jobs:
            log.info("flush.at_capacity", pending=pending, max_running_jobs=q.max_running_jobs)
        return created

    def _submit(self, batch_id: int) -> str | None:
        """Submit a claimed batch. The batch row was committed before this call (rule 1)."""
        if self.store.batch_chunk_count(batch_id) == 0:
            self.store.finish_batch(batch_id, self.config.queue.max_attempts, self.clock(), status="COMPLETED")
            log.info("batch.empty", batch_id=batch_id, google_job_id=None, reason="every chunk changed or was deleted before submit")
            return None
        started = time.monotonic()
        try:
            job = self.backend.submit(batch_id, self.store.batch_items(batch_id), progress=self.progress)
        except PermanentError as e:
            reason = f"submit rejected: {e}"
            n, failed = self.store.finish_batch(batch_id, self.config.queue.max_attempts, self.clock(),
                                                status="FAILED", error=reason)
            log.error("batch.submit_failed", batch_id=batch_id, google_job_id=None, error=str(e), chunks=n, chunks_failed=failed,
                      permanent=True)
            return None
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - transient: recorded, retried by recover()
            self.store.note_batch_error(batch_id, f"submit failed, will retry: {describe_error(e)}", self.clock())
            log.warning("batch.submit_retry", batch_id=batch_id, google_job_id=None, error=describe_error(e))
            return None
        self.store.mark_submitted(batch_id, job, self.clock())
        log.info("batch.submitted", batch_id=batch_id, google_job_id=job,
                 chunks=self.store.batch_chunk_count(batch_id),
                 duration_ms=round((time.monotonic() - started) * 1000))
        return job

    # ------------------------------------------------------------------ recover

    def recover(self) -> int:
        """Give every batch left PENDING without a job name exactly one remote job.

        Asks the backend for a job labelled with the batch (a create whose response was lost, or a crash
        between create and commit): adopts it if found, submits otherwise. Returns batches handled.
        """
        with self.store.worker_lock():
            return self._recover()

    def _recover(self) -> int:
        handled = 0
        for b in self.store.batches(["PENDING"]):
            if b.google_job_id:
                continue
            try:
                found = self.backend.find_job(b.id)
            except Exception as e:  # noqa: BLE001 - try again at the next cycle
                self.store.note_batch_error(b.id, f"recovery lookup failed, will retry: {describe_error(e)}",
                                            self.clock())
                log.warning("batch.recover_failed", batch_id=b.id, google_job_id=None, error=describe_error(e))
                continue
            if found:
                self.store.mark_submitted(b.id, found, self.clock())
                log.info("batch.adopted", batch_id=b.id, google_job_id=found)
            else:
                log.info("batch.resubmit", batch_id=b.id, google_job_id=None)
                self._submit(b.id)
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
                for b in self.store.batches(["RUNNING"]):
                    self._sync_one(b, summary)
                    self.progress()
            except Stopped:
                summary.stopped = True
                log.info("sync.stopped", applied=summary.applied)
        return summary

    def _sync_one(self, b: Any, summary: SyncSummary) -> None:
        q = self.config.queue
        job = b.google_job_id
        try:
            info = self.backend.status(job)
        except Stopped:
            raise
        except PermanentError as e:
            # The job is gone (deleted remotely, or a name the service no longer knows): waiting until
            # job_timeout would only delay the retry of its chunks.
            reason = f"remote job lost: {e}"
            n, failed = self.store.finish_batch(b.id, q.max_attempts, self.clock(), status="FAILED", error=reason)
            summary.errored += n
            summary.failed += failed
            summary.finished += 1
            log.error("job.lost", batch_id=b.id, google_job_id=job, error=str(e), chunks=n, chunks_failed=failed)
            return
        except Exception as e:  # noqa: BLE001 - one batch's trouble must not stop the others
            summary.errors.append(f"batch {b.id}: {describe_error(e)}")
            self.store.note_batch_error(b.id, f"status check failed, will retry: {describe_error(e)}", self.clock())
            log.warning("job.status_failed", batch_id=b.id, google_job_id=job, error=describe_error(e))
            return
        summary.checked += 1
        if info.state.value != b.remote_state or info.output:
            self.store.set_remote_state(b.id, info.state.value, self.clock(), info.output)
            if info.state.value != b.remote_state:
                log.info("job.state", batch_id=b.id, google_job_id=job, state=info.state.value)

        if not info.state.terminal:
            created = parse_iso(b.created_at) or self.clock()
            if self.clock() - created > q.job_timeout:
                self._time_out(b, summary)
            return

        if info.state.has_results:
            if not self._apply_all(b.id, job, summary):
                return  # stopped mid-way; the next sync re-reads and applies the rest
            n, failed = self.store.finish_batch(b.id, q.max_attempts, self.clock(), status="COMPLETED")
            summary.errored += n
            summary.failed += failed
            row = self.store.batch(b.id)
            log.info("batch.synced", batch_id=b.id, google_job_id=job, state=info.state.value,
                     applied=row.completed_chunks if row else None, missing=n,
                     failed=row.failed_chunks if row else None)
            self._cleanup(b.id, job)
        else:
            # A FAILED/CANCELLED/EXPIRED job may still export (and bill) the rows it completed: apply them first,
            # so only rows without a result go back to the queue.
            if info.output and not self._apply_all(b.id, job, summary):
                return
            reason = f"job {info.state.value}" + (f": {info.error}" if info.error else "")
            n, failed = self.store.finish_batch(b.id, q.max_attempts, self.clock(), status="FAILED", error=reason)
            summary.errored += n
            summary.failed += failed
            log.error("job.failed", batch_id=b.id, google_job_id=job, state=info.state.value, error=info.error,
                      chunks=n, chunks_failed=failed)
        summary.finished += 1

    def _apply_all(self, batch_id: int, job: str, summary: SyncSummary) -> bool:
        """Read every result line into a spool, then apply the spool in chunk-id order. False if reading failed,
        or if the results can never be read (a PermanentError, like an expired result file: what was read is
        applied, the batch is closed as FAILED and its other chunks go back to the queue).

        Two phases (store/spool.py): parsing holds no lock on the shared database; applying in id order
        writes neighbouring pages in each short transaction instead of ~40% of the table per slice. A job
        whose spool would pass SPOOL_MAX_BYTES is applied in rounds of that size. Stopped while spooling
        leaves nothing applied; while applying, whole slices (the next sync re-reads and applies the rest).
        """
        q = self.config.queue
        started = time.monotonic()
        lines = 0
        with self.store.open_spool(batch_id) as spool:
            try:
                for chunk in _slices(self.backend.results(job, progress=self.progress), RESULT_SLICE):
                    spool.add(chunk)
                    lines += len(chunk)
                    self.progress()
                    if spool.size_bytes() >= SPOOL_MAX_BYTES:
                        self._apply_spool(batch_id, spool, summary)
                        spool.clear()
            except Stopped:
                raise
            except PermanentError as e:
                self._apply_spool(batch_id, spool, summary)
                reason = f"results unavailable: {e}"
                n, failed = self.store.finish_batch(batch_id, q.max_attempts, self.clock(), status="FAILED",
                                                    error=reason)
                summary.errored += n
                summary.failed += failed
                summary.finished += 1
                log.error("job.results_lost", batch_id=batch_id, google_job_id=job, error=str(e), chunks=n,
                          chunks_failed=failed, lines=lines)
                return False
            except Exception as e:  # noqa: BLE001 - reading results failed; retry at the next sync
                summary.errors.append(f"batch {batch_id}: {describe_error(e)}")
                self.store.note_batch_error(batch_id, f"reading results failed, will retry: {describe_error(e)}",
                                            self.clock())
                log.warning("job.results_failed", batch_id=batch_id, google_job_id=job, error=describe_error(e),
                            lines=lines)
                return False
            read_ms = round((time.monotonic() - started) * 1000)
            self._apply_spool(batch_id, spool, summary)
        log.debug("job.results_read", batch_id=batch_id, google_job_id=job, lines=lines, read_ms=read_ms,
                  duration_ms=round((time.monotonic() - started) * 1000), max_attempts=q.max_attempts)
        return True

    def _apply_spool(self, batch_id: int, spool: Any, summary: SyncSummary) -> None:
        def on_slice(applied: int) -> None:
            summary.applied += applied
            self.progress()

        counts = self.store.apply_spool(batch_id, spool, self.config.queue.max_attempts, self.clock(),
                                        on_slice=on_slice)
        summary.errored += counts.errored
        summary.failed += counts.failed

    def _time_out(self, b: Any, summary: SyncSummary) -> None:
        q = self.config.queue
        try:
            self.backend.cancel(b.google_job_id)
        except Exception as e:  # noqa: BLE001 - cancel is best effort
            log.warning("job.cancel_failed", batch_id=b.id, google_job_id=b.google_job_id, error=describe_error(e))
        reason = f"job timed out after {_human(q.job_timeout)} and was cancelled"
        n, failed = self.store.finish_batch(b.id, q.max_attempts, self.clock(), status="FAILED", error=reason)
        summary.errored += n
        summary.failed += failed
        summary.finished += 1
        log.error("job.timed_out", batch_id=b.id, google_job_id=b.google_job_id, chunks=n, chunks_failed=failed)

    def _cleanup(self, batch_id: int, job: str) -> None:
        if not isinstance(self.backend, Cleanable):
            return
        try:
            self.backend.cleanup(batch_id, job)
        except Exception as e:  # noqa: BLE001 - staged files are only money, never correctness
            log.warning("batch.cleanup_failed", batch_id=batch_id, google_job_id=job, error=describe_error(e))

    # ------------------------------------------------------------------ operator actions

    def cancel(self, batch_id: int) -> bool:
        """Cancel a batch: best-effort remote cancel, its chunks back to PENDING (no attempt counted).

        Returns False when the batch does not exist or is already final.
        """
        b = self.store.batch(batch_id)
        if b is None or b.status in ("COMPLETED", "FAILED"):
            return False
        if b.google_job_id:
            try:
                self.backend.cancel(b.google_job_id)
            except Exception as e:  # noqa: BLE001
                log.warning("job.cancel_failed", batch_id=b.id, google_job_id=b.google_job_id, error=describe_error(e))
        n = self.store.cancel_batch_locally(batch_id, "batch cancelled by operator", self.clock())
        log.info("batch.cancelled", batch_id=batch_id, google_job_id=b.google_job_id, chunks=n)
        return True

    def retry_failed(self) -> int:
        n = self.store.retry_failed(self.clock())
        log.info("chunks.retried", chunks=n)
        return n


def _slices(lines: Iterator[ResultLine], size: int) -> Iterator[list[ResultLine]]:
    buf: list[ResultLine] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def describe_error(e: BaseException) -> str:
    """An exception as one short line for logs and error_message: its type and the first line of its text."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


__all__ = ["BackendError", "BatchManager", "JobState", "SyncSummary", "describe_error"]
