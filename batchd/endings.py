"""How a remote job's end becomes chunk states: the part of :class:`~batchd.manager.BatchManager` that reads a
finished job's output and closes its batch (a mixin: it uses the manager's store, backend, clock and its two
failure-policy moves, ``_close`` and ``_defer``).

What real jobs do that it is written for (issue 10; Google's Vertex AI batch inference docs and user pipelines
that ran real jobs, reviewed 2026-11):

- a job that ends FAILED, CANCELLED or EXPIRED still exports — and bills — the rows it completed ("If the batch
  inference job is terminated, all completed rows are exported. You are only charged for completed
  inferences"): its output is applied before any chunk goes back, and only chunks left without a result count
  an attempt. That includes batchd's own cancel at ``job_timeout`` (it waits through CANCELLING for the export,
  up to CANCEL_GRACE) and an operator's ``batchd cancel`` (up to CANCEL_WAIT);
- vectors longer than asked are cut (the backend's parser does it; counted here once per batch), inputs the
  service truncated are counted and warned about once per batch, and output lines that match no row are
  counted on the batch (``unmatched_lines``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog

from batchd.backends import BackendError, JobInfo, JobState, PermanentError, RawResults, ResultLine
from batchd.config import format_duration
from batchd.errors import is_expected, one_line
from batchd.faults import crash_point
from batchd.logs import MalformedLines
from batchd.parse_pool import ParsePool, worker_count
from batchd.progress import Activity, ReadProgress, computes_results
from batchd.store import ApplyCounts, parse_iso
from batchd.summary import SyncSummary

if TYPE_CHECKING:  # pragma: no cover
    from batchd.manager import BatchManager

    _Base = BatchManager
else:
    _Base = object

log = structlog.get_logger("batchd.manager")

RESULT_SLICE = 2_000  # lines parsed per spool transaction
SPOOL_MAX_BYTES = 1 << 30  # a bigger job (1M rows x 3,072 dims is ~12 GB) is spooled and applied in rounds
CANCEL_GRACE = 3600.0  # after job_timeout, how long a cancelled job may take to end before its chunks go back
CANCEL_WAIT = 30.0  # how long `batchd cancel` waits for the cancelled job's export


class JobEndings(_Base):
    def _timed_out(self, b: Any, grace: float = 0.0) -> bool:
        created = parse_iso(b.created_at) or self.clock()
        return self.ages.age(("batch", b.id), created) > self.config.queue.job_timeout + grace

    def _finish_job(self, b: Any, info: JobInfo, summary: SyncSummary) -> None:
        """Apply a terminal job's exported rows, then close its batch; rows without a result go back.

        A job that ends FAILED, CANCELLED or EXPIRED still exports — and bills — the rows it completed (Google,
        Vertex AI batch inference docs: "If the batch inference job is terminated, all completed rows are
        exported. You are only charged for completed inferences"): whenever it names an output, read it first,
        so no answered text is sent (and paid for) again. Only the chunks left without a result count an attempt.
        """
        job = b.google_job_id
        lines = None
        if info.state.has_results or info.output:
            lines = self._apply_all(b.id, job, summary)
            if lines is None:
                return  # deferred (the next sync re-reads and applies the rest), or closed: never readable
            if info.state.has_results and computes_results(self.backend):
                log.info("job.state", batch_id=b.id, google_job_id=job, state=info.state.value)  # now it is done
        row = self.store.batch(b.id)
        applied, unmatched = (row.completed_chunks, row.unmatched_lines) if row else (None, None)
        if not info.state.has_results:
            timed_out = info.state is JobState.CANCELLED and self._timed_out(b)  # batchd's own cancel
            if timed_out:
                reason = f"job timed out after {format_duration(self.config.queue.job_timeout)} and was cancelled"
            else:
                reason = f"job {info.state.value}" + (f": {info.error}" if info.error else "")
            self._close(summary, b.id, job, "FAILED", "job.timed_out" if timed_out else "job.failed", reason=reason,
                        state=info.state.value, error=info.error, applied=applied, unmatched=unmatched, lines=lines)
            # Its export was applied and its batch is closed (the chunks without a result go out in a new batch):
            # the staged texts and the output are of no more use, as after a success.
            self._cleanup(b.id, job)
            return
        self._compare_counts(b.id, job, info, lines or 0)
        self._close(summary, b.id, job, "COMPLETED", "batch.synced", state=info.state.value,
                    applied=applied, chunks_key="missing", failed=row.failed_chunks if row else None,
                    unmatched=unmatched, lines=lines, service_succeeded=info.succeeded, service_failed=info.failed)
        self._cleanup(b.id, job)

    def _compare_counts(self, batch_id: int, job: str, info: JobInfo, lines: int) -> None:
        """The service's own count of the rows it answered against the lines read: fewer lines means output
        files batchd did not find (a changed output layout, a listing cut short) — their chunks come back as
        missing and are retried, and the operator should know why."""
        if info.succeeded is None or info.failed is None:
            return
        if lines < info.succeeded + info.failed:
            log.warning("job.output_short", batch_id=batch_id, google_job_id=job, lines=lines,
                        service_succeeded=info.succeeded, service_failed=info.failed)

    def _apply_all(self, batch_id: int, job: str, summary: SyncSummary) -> int | None:
        """Read every result line into a spool, then apply the spool in chunk-id order. Returns the lines read,
        None when reading failed (the batch is deferred) or can never succeed (a PermanentError from the backend,
        like an expired result file: what was read is applied and the batch is closed FAILED, its other chunks
        back in the queue with the reason).

        Two phases (store/spool.py): parsing holds no lock on the shared database; applying in id order
        writes neighbouring pages in each short transaction instead of ~40% of the table per slice. A job
        whose spool would pass SPOOL_MAX_BYTES is applied in rounds of that size. Stopped while spooling
        leaves nothing applied; while applying, whole slices (the next sync re-reads and applies the rest).
        """
        q = self.config.queue
        started = time.monotonic()
        lines = unmatched = truncated = cut = 0
        answered_dims: set[int] = set()
        read = ReadProgress(Activity(batch_id, self.store.batch_text_count(batch_id),
                                     "embedding" if computes_results(self.backend) else "reading"),
                            self.on_activity, self.progress)
        with self.store.open_spool(batch_id) as spool, contextlib.ExitStack() as workers:
            try:
                source = self._result_lines(job, read, workers)
                for chunk in _slices(read.count(source), RESULT_SLICE):
                    spool.add(chunk)
                    lines += len(chunk)
                    read.report()
                    for line in chunk:
                        if not line.keys:
                            unmatched += 1  # a line tied to no text at all
                        elif line.cut:
                            cut += 1
                            answered_dims.add(line.answered_dims or 0)
                    self.progress()
                    if spool.size_bytes() >= SPOOL_MAX_BYTES:
                        counts = self._apply_spool(batch_id, spool, summary)
                        unmatched, truncated = unmatched + counts.unmatched, truncated + counts.truncated
                        spool.clear()
            except PermanentError as e:
                # The output can never be read (a result file the service has already deleted): deferring would
                # retry at every sync forever. What was read is applied; the rest goes back to the queue now.
                self._apply_spool(batch_id, spool, summary)
                self._close(summary, batch_id, job, "FAILED", "job.results_lost", reason=f"results unavailable: {e}",
                            error=str(e), lines=lines)
                return None
            except Exception as e:  # noqa: BLE001 - reading results failed; retry at the next sync
                self._defer(summary, batch_id, job, "reading results failed", e, "job.results_failed", lines=lines)
                return None
            read_ms = round((time.monotonic() - started) * 1000)
            counts = self._apply_spool(batch_id, spool, summary)
            unmatched, truncated = unmatched + counts.unmatched, truncated + counts.truncated
        log.debug("job.results_read", batch_id=batch_id, google_job_id=job, lines=lines, read_ms=read_ms,
                  duration_ms=round((time.monotonic() - started) * 1000), max_attempts=q.max_attempts)
        self.store.record_unmatched(batch_id, unmatched, self.clock())
        # Once per batch, not per line: what the service did to this batch's inputs and vectors.
        if cut:
            log.info("batch.vectors_cut", batch_id=batch_id, google_job_id=job, lines=cut,
                     answered_dimensions=sorted(answered_dims), dimensions=self._dims)
        if truncated:
            log.warning("batch.inputs_truncated", batch_id=batch_id, google_job_id=job, chunks=truncated)
        if unmatched:
            log.warning("job.output_unmatched", batch_id=batch_id, google_job_id=job, lines=unmatched)
        return lines

    def _result_lines(self, job: str, read: ReadProgress, workers: contextlib.ExitStack) -> Iterator[ResultLine]:
        """The job's parsed lines: from parse worker processes fed the raw output (a RawResults backend, a batch
        big enough; see batchd.parse_pool), else from the backend's own ``results``. The workers are closed
        with ``workers``."""
        n = worker_count(self.config.daemon.parse_workers, read.act.total or 0)
        if not n or not isinstance(self.backend, RawResults):
            return self.backend.results(job, progress=read.tick)

        try:
            pool = workers.enter_context(ParsePool(self.backend.line_parser(), n, wait=self.progress,
                                                   on_malformed=MalformedLines(log, job)))
        except BackendError as e:  # nothing read yet: parse in this process, as for a small batch
            log.warning("job.parse_workers_unavailable", google_job_id=job, workers=n, error=one_line(e))
            return self.backend.results(job, progress=read.tick)
        log.info("job.parse_workers", google_job_id=job, workers=n)
        return pool.lines(self.backend.result_files(job, progress=read.tick))

    def _apply_spool(self, batch_id: int, spool: Any, summary: SyncSummary) -> ApplyCounts:
        def on_slice(applied: int) -> None:
            summary.applied += applied
            crash_point("results.slice_applied")
            self.progress()

        counts = self.store.apply_spool(batch_id, spool, self.config.queue.max_attempts, self.clock(),
                                        on_slice=on_slice)
        summary.errored += counts.errored
        summary.failed += counts.failed
        return counts

    def _time_out(self, b: Any, info: JobInfo, summary: SyncSummary) -> None:
        """Cancel a job past job_timeout, then read what it exported before its chunks go back.

        A cancel takes effect after a while (CANCELLING): the batch stays RUNNING, polled each sync, until the
        job is final and its export applied (:meth:`_finish_job`) — or until CANCEL_GRACE more has passed, when
        its chunks go back anyway (rows it exports later would then be paid twice: said in the reason).
        """
        job, timeout = b.google_job_id, format_duration(self.config.queue.job_timeout)
        if info.state is not JobState.CANCELLING:
            self._cancel_remote(b.id, job)
            try:
                info = self.backend.status(job)
            except Exception as e:
                self.remote_errors["status"] += 1
                log.warning("job.status_failed", batch_id=b.id, google_job_id=job, error=one_line(e),
                            exc_info=not is_expected(e))
        if info.state.terminal:
            self.store.set_remote_state(b.id, info.state.value, self.clock(), info.output)
            self._finish_job(b, info, summary)
            return
        if not self._timed_out(b, CANCEL_GRACE):
            self.store.note_batch_error(b.id, f"job timed out after {timeout}: cancel requested, waiting for its "
                                        "export", self.clock())
            log.warning("job.cancelling", batch_id=b.id, google_job_id=job, state=info.state.value)
            return
        self._close(summary, b.id, job, "FAILED", "job.timed_out", state=info.state.value, export_read=False,
                    reason=f"job timed out after {timeout} and was cancelled (still {info.state.value} "
                           f"{format_duration(CANCEL_GRACE)} later; its export was not read)")

    def _apply_cancelled_export(self, batch_id: int, job: str) -> None:
        """Wait up to CANCEL_WAIT for a cancelled job to end, then apply the rows it exported (paid for)."""
        deadline = time.monotonic() + CANCEL_WAIT
        while True:
            try:
                info = self.backend.status(job)
            except Exception as e:
                self.remote_errors["status"] += 1
                log.warning("job.status_failed", batch_id=batch_id, google_job_id=job, error=one_line(e),
                            exc_info=not is_expected(e))
                return
            if info.state.terminal or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if not info.state.terminal:
            log.warning("job.cancel_unconfirmed", batch_id=batch_id, google_job_id=job, state=info.state.value,
                        wait_s=CANCEL_WAIT)
            return
        b = self.store.batch(batch_id)
        if (info.output or info.state.has_results) and b is not None and b.status in ("PENDING", "RUNNING"):
            self._apply_all(batch_id, job, SyncSummary())


def _slices(lines: Iterator[ResultLine], size: int) -> Iterator[list[ResultLine]]:
    buf: list[ResultLine] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


__all__ = ["CANCEL_GRACE", "CANCEL_WAIT", "RESULT_SLICE", "SPOOL_MAX_BYTES", "JobEndings"]
