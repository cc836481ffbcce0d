"""The JSON Lines batchd writes for the Gemini Developer API's Batch Mode, and reads back. Pure: no I/O, no SQL.

What is confirmed, and from where (checked 2026-11):

- Input line ``{"key": <content hash>, "request": {"content": {"parts": [{"text": ...}]}, "task_type": ...,
  "output_dimensionality": N}}``: the request fields sit FLAT in ``request`` (an EmbedContentRequest), not in
  Vertex's ``embed_content_config`` wrapper. Sources: Google's announcement of embeddings in the Batch API
  (Sept 2025; its sample line has a flat ``output_dimensionality``), and google-genai's own mapping of inlined
  embedding requests (``_EmbedContentConfig_to_mldev`` in batches.py, 3.x: ``taskType`` and
  ``outputDimensionality`` set on each request next to ``content``). The service parses proto JSON, which
  accepts snake_case field names as well as camelCase.
- ``key`` is the caller's and is echoed on the output line; output order is not the input order ("Batch Mode"
  guide). batchd uses the content hash as key, so duplicates inside a batch are sent once.
- Output line ``{"key": ..., "response": {"embedding": {"values": [...]}}}`` or ``{"key": ..., "error":
  {"code", "message", "status"}}`` (a google.rpc.Status). UNCONFIRMED: where the token count sits;
  ``response.tokenCount`` (an int64, so a JSON string) and ``response.usageMetadata.promptTokenCount`` are read.
- Vectors go through :func:`batchd.vectors.fit_vector`: a longer vector is cut and renormalised, and every
  vector smaller than gemini-embedding-001's full 3,072 is renormalised (only the full size comes normalised).
"""

from __future__ import annotations

from typing import Any

import orjson

from batchd.backends import Item, ResultLine
from batchd.vectors import VectorError, fit_vector

MAX_ERROR = 500  # characters of a line's error kept for error_message
FULL_DIMENSIONS = 3_072  # gemini-embedding-001's own size, the only one that comes unit length


class GeminiApiLines:
    """Input lines to write and output lines to read, for one task type and size."""

    def __init__(self, task_type: str, dimensions: int):
        self.task_type, self.dimensions = task_type, dimensions
        self.renormalise = dimensions < FULL_DIMENSIONS

    def input_line(self, item: Item) -> bytes:
        """One JSONL line (with its newline) asking for ``item``'s embedding."""
        request = {"content": {"parts": [{"text": item.text}]}, "task_type": self.task_type,
                   "output_dimensionality": self.dimensions}
        return orjson.dumps({"key": item.key, "request": request}) + b"\n"

    def parse(self, raw: bytes) -> tuple[ResultLine | None, bool]:
        """(ResultLine, whether the vector was cut) for one output line; (None, False) when it names no row.

        An ``error``, a missing embedding or an unusable vector is an error line for its row.
        """
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None, False
        if not isinstance(obj, dict):
            return None, False
        key = obj.get("key")
        if not isinstance(key, str) or not key:
            return None, False
        keys = (key,)
        error = _error_text(obj.get("error")) or _error_text(obj.get("status"))
        if error:
            return ResultLine(keys, error=error[:MAX_ERROR]), False
        resp = obj.get("response")
        values = _values(resp)
        if values is None:
            return ResultLine(keys, error="no embedding in the result line"), False
        try:
            blob, cut = fit_vector(values, self.dimensions, renormalise=self.renormalise)
        except VectorError as e:
            return ResultLine(keys, error=str(e)), False
        return ResultLine(keys, vector=blob, token_count=_tokens(resp)), cut


def _error_text(err: Any) -> str | None:
    if isinstance(err, str):
        return err or None
    if isinstance(err, dict) and (err.get("message") or err.get("code") or err.get("status")):
        msg = err.get("message") or err.get("status") or f"error code {err.get('code')}"
        code = err.get("code")
        return f"{code} {msg}" if isinstance(code, int) and code else str(msg)
    return None


def _values(resp: Any) -> list[Any] | None:
    if not isinstance(resp, dict):
        return None
    emb = resp.get("embedding")
    if isinstance(emb, dict) and isinstance(emb.get("values"), list):
        return emb["values"]  # type: ignore[no-any-return]
    embs = resp.get("embeddings")  # the batchEmbedContents shape, should a line ever come back in it
    if isinstance(embs, list) and len(embs) == 1 and isinstance(embs[0], dict) and isinstance(embs[0].get("values"), list):
        return embs[0]["values"]  # type: ignore[no-any-return]
    return None


def _tokens(resp: dict[str, Any]) -> int | None:
    for value in (resp.get("tokenCount"), resp.get("token_count"),
                  (resp.get("usageMetadata") or {}).get("promptTokenCount")
                  if isinstance(resp.get("usageMetadata"), dict) else None):
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


__all__ = ["FULL_DIMENSIONS", "GeminiApiLines"]
