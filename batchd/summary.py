"""What one step of the manager did: the summaries :class:`~batchd.manager.BatchManager` returns.

The CLI prints them and the daemon logs them (``flush.done``, ``sync.done``) instead of querying the database
again. The manager's two failure moves record into them: ``note_closed`` (a batch ended for good, with a status
and a reason) and ``note_deferred`` (a batch left for the next cycle, with the reason on its row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SyncSummary:
    """What one :meth:`BatchManager.sync_status` did; the CLI and the daemon read it instead of the database."""

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

    @property
    def ok(self) -> bool:
        """False when any batch's remote call failed this time: the sync returned, but did not succeed (health)."""
        return not self.errors

    def note_closed(self, batch_id: int, status: str, reason: str | None, chunks: int, chunks_failed: int) -> None:
        self.finished += 1
        self.errored += chunks
        self.failed += chunks_failed

    def note_deferred(self, batch_id: int, reason: str, error: str) -> None:
        self.errors.append(f"batch {batch_id}: {error}")


@dataclass(frozen=True)
class NotSubmitted:
    """A batch a flush claimed (or recovered) that has no running job afterwards, and why."""

    batch_id: int
    status: str  # PENDING (will be submitted again), FAILED (rejected) or COMPLETED (found empty)
    reason: str


@dataclass
class FlushSummary:
    """What one :meth:`BatchManager.flush_queue` did (recovery of earlier batches included)."""

    created: list[int] = field(default_factory=list)  # batches claimed by this flush, in order
    submitted: list[int] = field(default_factory=list)  # batches whose job was created or adopted
    not_submitted: list[NotSubmitted] = field(default_factory=list)  # closed without a job, or deferred
    errored: int = 0  # chunks sent back (or FAILED) with a closed batch
    failed: int = 0  # chunks that reached max_attempts
    stopped: bool = False  # shutdown interrupted the flush
    over_budget: bool = False  # [budget] held pending chunks back (not an error: they wait for the next period)
    budget: str = ""  # the budget as this flush saw it ("today $0.0123 of $5.00", "over budget until ..."), if capped

    @property
    def errors(self) -> list[str]:
        """One line per batch left without a job, like :attr:`SyncSummary.errors`."""
        return [f"batch {n.batch_id}: {n.reason}" for n in self.not_submitted if n.status != "COMPLETED"]

    @property
    def deferred(self) -> list[int]:
        """Batches left PENDING without a job: recover() submits them again."""
        return [n.batch_id for n in self.not_submitted if n.status == "PENDING"]

    def as_dict(self) -> dict[str, Any]:
        return {"created": list(self.created), "submitted": list(self.submitted),
                "not_submitted": [n.batch_id for n in self.not_submitted], "errored": self.errored,
                "failed": self.failed, "stopped": self.stopped,
                **({"over_budget": self.over_budget, "budget": self.budget} if self.budget else {})}

    def note_closed(self, batch_id: int, status: str, reason: str | None, chunks: int, chunks_failed: int) -> None:
        self.errored += chunks
        self.failed += chunks_failed
        self._forget(batch_id)
        self.not_submitted.append(NotSubmitted(batch_id, status, reason or ""))

    def note_deferred(self, batch_id: int, reason: str, error: str) -> None:
        self._forget(batch_id)
        self.not_submitted.append(NotSubmitted(batch_id, "PENDING", reason))

    def note_submitted(self, batch_id: int) -> None:
        self._forget(batch_id)
        self.submitted.append(batch_id)

    def _forget(self, batch_id: int) -> None:
        self.not_submitted = [n for n in self.not_submitted if n.batch_id != batch_id]


@dataclass(frozen=True)
class Drained:
    """How :meth:`BatchManager.drain` ended: ``why`` is "idle", "stalled", "stopped", "gave_up" or "over_budget"
    (nothing running and the budget holds the pending chunks back)."""

    why: str
    rounds: int
    stats: dict[str, Any] | None
    detail: str = ""

    @property
    def idle(self) -> bool:
        return self.why == "idle"


__all__ = ["Drained", "FlushSummary", "NotSubmitted", "SyncSummary"]
