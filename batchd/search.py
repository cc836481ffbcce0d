"""Semantic search over chunks_vec: embed the query with the configured backend, then a sqlite-vec KNN query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.backends import Backend, PermanentError, QueryEmbedder
from batchd.store import Store


@dataclass(frozen=True)
class Hit:
    rank: int
    chunk_id: int
    distance: float  # cosine distance: 0 is identical, 2 is opposite
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "chunk_id": self.chunk_id, "distance": self.distance, "text": self.text}


def search(store: Store, backend: Backend, text: str, k: int = 10) -> list[Hit]:
    """The ``k`` chunks nearest to ``text``, nearest first.

    Raises PermanentError when the backend cannot embed queries, BackendError when embedding fails.
    """
    if not isinstance(backend, QueryEmbedder):
        raise PermanentError(f"backend {type(backend).__name__} cannot embed search queries")
    if k < 1:
        raise ValueError("k must be at least 1")
    query = backend.embed_query(text)
    return [Hit(rank, cid, dist, body) for rank, (cid, dist, body) in enumerate(store.search(query, k), start=1)]


def snippet(text: str, width: int = 80) -> str:
    """The first ``width`` characters of ``text`` on one line (an ellipsis when cut)."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


__all__ = ["Hit", "search", "snippet"]
