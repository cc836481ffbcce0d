"""The JSON Lines batchd writes for Vertex batch jobs and reads back, for both model families (VERTEX.md).

Classic models (``text-embedding-005`` ...) get ``{"content", "task_type"}`` per distinct text and echo the
instance in their output, so a line is tied to its rows by hashing the echoed content. Gemini
(``gemini-embedding-001``) gets ``{"key", "request"}`` and answers with the same ``key``. Pure functions of
bytes: no network, no SQL.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any

import orjson

from batchd.backends import Item, ResultLine, content_hash

MAX_ERROR = 500  # characters of a line's error kept for error_message


class LineFormat:
    """Input lines to write and output lines to read, for one model, task type and size."""

    def __init__(self, model: str, task_type: str, dimensions: int):
        self.model, self.task_type, self.dimensions = model, task_type, dimensions
        self.gemini = model.startswith("gemini-")

    def input_line(self, item: Item) -> bytes:
        """One JSONL line (with its newline) asking for ``item``'s embedding."""
        if self.gemini:
            line: dict[str, Any] = {"key": item.key, "request": {
                "content": {"parts": [{"text": item.text}]},
                "embed_content_config": {"task_type": self.task_type, "output_dimensionality": self.dimensions}}}
        else:
            line = {"content": item.text, "task_type": self.task_type}
        return orjson.dumps(line) + b"\n"

    def parse(self, raw: bytes) -> ResultLine | None:
        """One output line -> a ResultLine, or None when it cannot be tied to any row (malformed).

        A line with a non-empty ``status``, an ``error`` object, no embedding, or a vector of the wrong
        length is an error for its rows; only a line naming no row at all is None.
        """
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        key = self.key_of(obj)
        if key is None:
            return None
        keys = (key,)
        err, status = obj.get("error"), obj.get("status")
        if isinstance(err, dict) and (err.get("message") or err.get("code")):
            return ResultLine(keys, error=str(err.get("message") or f"error code {err.get('code')}")[:MAX_ERROR])
        if isinstance(err, str) and err:
            return ResultLine(keys, error=err[:MAX_ERROR])
        if isinstance(status, str) and status:
            return ResultLine(keys, error=status[:MAX_ERROR])
        values, tokens = embedding_values(obj)
        if values is None:
            return ResultLine(keys, error="no embedding in the result line")
        if len(values) != self.dimensions:
            return ResultLine(keys, error=f"vector has {len(values)} dimensions, expected {self.dimensions}")
        try:
            blob = float32_blob(values)
        except (TypeError, OverflowError):
            return ResultLine(keys, error="embedding values are not numbers")
        return ResultLine(keys, vector=blob, token_count=tokens)

    def key_of(self, obj: dict[str, Any]) -> str | None:
        """The content hash a line answers: its ``key``, else a hash of the echoed text (+ task type)."""
        key = obj.get("key")
        if isinstance(key, str) and key:
            return key
        inst = obj.get("instance")
        if isinstance(inst, dict) and isinstance(inst.get("content"), str):
            task = inst.get("task_type") or inst.get("taskType") or self.task_type
            return content_hash(inst["content"], self.model, str(task), self.dimensions)
        req = obj.get("request")
        if isinstance(req, dict):  # a Gemini line without its key: hash the request's text
            try:
                text = req["content"]["parts"][0]["text"]
            except (KeyError, IndexError, TypeError):
                return None
            if isinstance(text, str):
                cfg = req.get("embed_content_config") or req.get("embedContentConfig") or {}
                task = (cfg.get("task_type") or cfg.get("taskType")) if isinstance(cfg, dict) else None
                return content_hash(text, self.model, str(task or self.task_type), self.dimensions)
        return None


def embedding_values(obj: dict[str, Any]) -> tuple[list[Any] | None, int | None]:
    """(values, token_count) from a classic ``predictions[0].embeddings`` or a Gemini ``response``
    (``response.embedding.values``, falling back to ``response.embeddings[0].values``: UNCONFIRMED shape)."""
    preds = obj.get("predictions")
    if isinstance(preds, list) and preds and isinstance(preds[0], dict):
        emb = preds[0].get("embeddings")
        if isinstance(emb, dict) and isinstance(emb.get("values"), list):
            stats = emb.get("statistics")
            tokens = stats.get("token_count") if isinstance(stats, dict) else None
            return emb["values"], int(tokens) if isinstance(tokens, (int, float)) else None
    resp = obj.get("response")
    if isinstance(resp, dict):
        emb = resp.get("embedding")
        if isinstance(emb, dict) and isinstance(emb.get("values"), list):
            return emb["values"], None
        embs = resp.get("embeddings")
        if isinstance(embs, list) and embs and isinstance(embs[0], dict) and isinstance(embs[0].get("values"), list):
            return embs[0]["values"], None
    return None, None


def float32_blob(values: list[Any]) -> bytes:
    """Little-endian float32, as sqlite-vec stores vectors. Raises TypeError for non-numbers."""
    vec = array("f", values)
    if sys.byteorder != "little":  # pragma: no cover - sqlite-vec blobs are little-endian
        vec.byteswap()
    return vec.tobytes()


__all__ = ["LineFormat", "embedding_values", "float32_blob"]
