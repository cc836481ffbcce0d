"""Reads: queue counts, batches, failure reasons and KNN search. Nothing here writes or takes the write lock."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from batchd.store.connection import StoreBase


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


_BATCH_COLS = ("id", "google_job_id", "status", "total_chunks", "completed_chunks", "failed_chunks", "error_message",
               "model", "input_uri", "output_uri", "remote_state", "token_count", "created_at", "updated_at",
               "finished_at")


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
            f"(SELECT count(*) FROM {t})").fetchone()
        batches = {"PENDING": 0, "RUNNING": 0, "COMPLETED": 0, "FAILED": 0}
        for status, n in self._conn.execute("SELECT status, count(*) FROM batch_jobs GROUP BY status"):
            batches[status] = n
        all_pending, running, failed, total = row
        return {"pending": all_pending - running, "running": running, "ready": total - all_pending - failed,
                "failed": failed, "batches": batches}

    def chunk(self, chunk_id: int) -> dict[str, Any] | None:
        cur = self._conn.execute(
            f"SELECT {self.q_id}, {self.q_text}, embedding_status, batch_job_id, error_message, attempts, content_hash, "
            f"embedded_at FROM {self.q_table} WHERE {self.q_id} = ?", (chunk_id,))
        r = cur.fetchone()
        if r is None:
            return None
        keys = ("id", "text", "embedding_status", "batch_job_id", "error_message", "attempts", "content_hash",
                "embedded_at")
        return dict(zip(keys, r))

    def chunks(self) -> list[dict[str, Any]]:
        """Every chunk with batchd's columns (for tests and small tools; not for big tables)."""
        keys = ("id", "text", "embedding_status", "batch_job_id", "error_message", "attempts", "content_hash")
        cur = self._conn.execute(
            f"SELECT {self.q_id}, {self.q_text}, embedding_status, batch_job_id, error_message, attempts, content_hash "
            f"FROM {self.q_table} ORDER BY {self.q_id}")
        return [dict(zip(keys, r)) for r in cur]

    def vector(self, chunk_id: int) -> bytes | None:
        row = self._conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (chunk_id,)).fetchone()
        return bytes(row[0]) if row else None

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

