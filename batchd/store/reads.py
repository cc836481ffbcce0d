"""Reads: queue counts, batches, failure reasons, KNN search, the file's integrity check. Nothing here writes or
takes the write lock."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from batchd.store.connection import StoreBase

INTEGRITY_FULL_BELOW = 512 * 1024 * 1024  # bytes; a full integrity_check of a bigger file takes minutes
INTEGRITY_MAX_PROBLEMS = 20


@dataclass(frozen=True)
class BatchRow:
    id: int
    google_job_id: str | None
    status: str
    total_chunks: int
    completed_chunks: int
    failed_chunks: int
    error_message: str | None
    model: str | None
    input_uri: str | None
    output_uri: str | None
    remote_state: str | None
    token_count: int | None
    created_at: str
    updated_at: str
    finished_at: str | None
    unmatched_lines: int = 0  # output lines of the job that named no row


_BATCH_COLS = ("id", "google_job_id", "status", "total_chunks", "completed_chunks", "failed_chunks", "error_message",
               "model", "input_uri", "output_uri", "remote_state", "token_count", "created_at", "updated_at",
               "finished_at", "unmatched_lines")


class ReadsMixin(StoreBase):
    def batches(self, statuses: Iterable[str] | None = None, limit: int | None = None) -> list[BatchRow]:
        sql = f"SELECT {', '.join(_BATCH_COLS)} FROM batch_jobs"
        params: list[Any] = []
        if statuses is not None:
            st = list(statuses)
            sql += f" WHERE status IN ({', '.join('?' * len(st))})"
            params += st
        sql += " ORDER BY id DESC" if limit else " ORDER BY id"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return [BatchRow(*r) for r in self._conn.execute(sql, params)]

    def batch(self, batch_id: int) -> BatchRow | None:
        r = self._conn.execute(f"SELECT {', '.join(_BATCH_COLS)} FROM batch_jobs WHERE id = ?", (batch_id,)).fetchone()
        return BatchRow(*r) if r else None

    def queue_stats(self) -> dict[str, Any]:
        """Chunk counts per state and batch counts per status, in one read transaction.

        READY is the total minus the other states (every chunk is in exactly one): counting the biggest
        group entry by entry is what made this slow; the total is counted page by page over the narrow status
        index, the others are range scans (PENDING over the narrow index too, minus those in flight), so the
        cost grows with the chunks that are not READY. Figures: README, "Benchmarks".
        """
        t = self.q_table
        row = self._conn.execute(
            f"SELECT "
            f"(SELECT count(*) FROM {t} WHERE embedding_status = 'PENDING'), "
            f"(SELECT count(*) FROM {t} WHERE embedding_status = 'PENDING' AND batch_job_id IS NOT NULL), "
            f"(SELECT count(*) FROM {t} WHERE embedding_status = 'FAILED'), "
            f"(SELECT count(*) FROM {t}), "
            f"(SELECT count(*) FROM {t} WHERE truncated = 1 AND embedding_status = 'READY')").fetchone()
        batches = {"PENDING": 0, "RUNNING": 0, "COMPLETED": 0, "FAILED": 0}
        for status, n in self._conn.execute("SELECT status, count(*) FROM batch_jobs GROUP BY status"):
            batches[status] = n
        all_pending, running, failed, total, truncated = row
        return {"pending": all_pending - running, "running": running, "ready": total - all_pending - failed,
                "failed": failed, "truncated": truncated, "batches": batches}

    def vector_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM chunks_vec").fetchone()[0])

    def search(self, query: bytes, k: int) -> list[tuple[int, float, str]]:
        """KNN over chunks_vec: (chunk_id, cosine distance, text). Uses `k = ?` (works before SQLite 3.41)."""
        rows = self._conn.execute(
            f"SELECT v.chunk_id, v.distance, c.{self.q_text} FROM "
            f"(SELECT chunk_id, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ?) v "
            f"JOIN {self.q_table} c ON c.{self.q_id} = v.chunk_id ORDER BY v.distance", (query, k)).fetchall()
        return [(int(r[0]), float(r[1]), r[2]) for r in rows]

    # ------------------------------------------------------------------ operator actions
    def failure_reasons(self, limit: int = 5) -> list[tuple[str, int]]:
        """The most common error_message among FAILED chunks, with counts (through the status index)."""
        rows = self._conn.execute(
            f"SELECT coalesce(error_message, '(no reason recorded)'), count(*) FROM {self.q_table} "
            "WHERE embedding_status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?", (limit,)).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]


    def integrity(self, full_below_bytes: int = INTEGRITY_FULL_BELOW) -> tuple[str, list[str]]:
        """SQLite's own check of the file: ``integrity_check`` (every b-tree, index and constraint) for files up
        to ``full_below_bytes``, ``quick_check`` (the same without cross-checking indexes; linear time) above.

        Returns (which check ran, problems found, at most INTEGRITY_MAX_PROBLEMS); no problems = the file is whole.
        A read: never takes the write lock.
        """
        path = self.config.database.path
        try:
            size = os.path.getsize(path) if path != ":memory:" else 0
        except OSError:
            size = 0
        pragma = "integrity_check" if size < full_below_bytes else "quick_check"
        rows = self._conn.execute(f"PRAGMA {pragma}({INTEGRITY_MAX_PROBLEMS})").fetchall()
        # A row may hold several lines; "*** in database main ***" heads the problems of a database and is not
        # one itself.
        lines = [line.strip() for r in rows for line in str(r[0]).splitlines()]
        found = [line for line in lines if line and line.lower() != "ok" and not line.startswith("***")]
        return pragma, found
