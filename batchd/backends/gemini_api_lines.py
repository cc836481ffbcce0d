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
  ``response.tokenCount`` (an int64, so a JSON string) is read, as on Vertex's Gemini lines.
- Vectors go through :func:`batchd.vectors.fit_vector`: a longer vector is cut and renormalised, and every
  vector smaller than gemini-embedding-001's full 3,072 is renormalised (only the full size comes normalised).
"""

from __future__ import annotations

import orjson

from batchd.backends import Item, ResultLine
from batchd.backends.vertex_lines import json_object, result_for

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

    def parse(self, raw: bytes) -> ResultLine | None:
        """One output line -> a ResultLine, or None when it names no row (not JSON, no ``key``).

        An ``error``, a missing embedding or an unusable vector is an error line for its row. The response
        shapes are read by the same functions as Vertex's Gemini lines (``vertex_lines.result_for``).
        """
        obj = json_object(raw)
        if obj is None:
            return None
        key = obj.get("key")
        if not isinstance(key, str) or not key:
            return None
        return result_for((key,), obj, self.dimensions, renormalise=self.renormalise)


__all__ = ["FULL_DIMENSIONS", "GeminiApiLines"]
