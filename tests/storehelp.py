"""Reads of batchd's rows that only tests need (whole-table dumps, one chunk's columns, one vector).

They hold their own SQL on purpose: batchd's Store keeps what the product uses, and a test may look at the database
any way it likes. They run on the Store's own connection, which has sqlite-vec loaded (chunks_vec needs it).
"""

from __future__ import annotations

from typing import Any

_KEYS = ("id", "text", "embedding_status", "batch_job_id", "error_message", "attempts", "content_hash")


def store_chunks(store: Any) -> list[dict[str, Any]]:
    """Every chunk with batchd's columns, by id (small tables only)."""
    cur = store._conn.execute(
        f"SELECT {store.q_id}, {store.q_text}, embedding_status, batch_job_id, error_message, attempts, content_hash "
        f"FROM {store.q_table} ORDER BY {store.q_id}")
    return [dict(zip(_KEYS, r)) for r in cur]


def store_chunk(store: Any, chunk_id: int) -> dict[str, Any] | None:
    """One chunk with batchd's columns (and embedded_at), or None."""
    r = store._conn.execute(
        f"SELECT {store.q_id}, {store.q_text}, embedding_status, batch_job_id, error_message, attempts, content_hash, "
        f"embedded_at FROM {store.q_table} WHERE {store.q_id} = ?", (chunk_id,)).fetchone()
    return None if r is None else dict(zip((*_KEYS, "embedded_at"), r))


def store_vector(store: Any, chunk_id: int) -> bytes | None:
    row = store._conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (chunk_id,)).fetchone()
    return bytes(row[0]) if row else None
