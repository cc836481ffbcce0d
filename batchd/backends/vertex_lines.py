"""The JSON Lines batchd writes for Vertex batch jobs and reads back, for both model families (VERTEX.md).

Classic models (``text-embedding-005`` ...) get ``{"content", "task_type"}`` per distinct text and echo the
instance in their output, so a line is tied to its rows by hashing the echoed content. Gemini
(``gemini-embedding-001``) gets ``{"key", "request"}`` and answers with the same ``key``. Pure functions of
bytes: no network, no SQL. :func:`json_object` and :func:`result_for` are shared with other backends that read
Gemini ``EmbedContentResponse`` objects (the Gemini Developer API's batch mode).

What each accepted shape rests on (issue 10; VERTEX.md "What real jobs do"):

- classic ``{"instance", "predictions": [{"embeddings": {"statistics": {"token_count", "truncated"},
  "values"}}], "status": ""}`` — CONFIRMED (Google's "batch embeddings" page, sample output line).
- classic singular ``"prediction": {...}`` — UNCONFIRMED (the generic batch-prediction contract writes
  ``prediction`` for some models); accepted so a surprise is not "missing" forever.
- Gemini ``{"key", "request", "response": {"tokenCount": "2", "embedding": {"values"}}}`` — CONFIRMED shape
  (Google's page; python-genai #486); ``tokenCount`` is an int64, hence a JSON string. The fallback
  ``response.embeddings[0].values`` is UNCONFIRMED.
- Gemini vectors of 3,072 values for a smaller ``output_dimensionality`` — CONFIRMED by two user pipelines
  (they keep the prefix and renormalise): :func:`batchd.vectors.fit_vector` does the same.
- failed rows: ``"status": "Bad Request: ..."`` with an empty response — CONFIRMED; an errors-file line that is
  the bare instance plus ``"error": {"code", "message"}`` and an ``error`` with only ``status`` — the generic
  batch contract, UNCONFIRMED for embeddings.
- a classic echo without ``task_type`` — seen in user pipelines. The row is always hashed with the
  CONFIGURED task type (the only one batchd sends), never with an echoed spelling.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.backends import Item, ResultLine, content_hash
from batchd.backends.models import family_of
from batchd.pricing import billable_characters
from batchd.vectors import VectorError, fit_vector

MAX_ERROR = 500  # characters of a line's error kept for error_message


@dataclass(frozen=True, slots=True)
class Embedding:
    """What one answered row holds: the raw values, and what the service says about the input."""

    values: list[Any]
    token_count: int | None = None
    truncated: bool = False


class LineFormat:
    """Input lines to write and output lines to read, for one model, task type and size."""

    def __init__(self, model: str, task_type: str, dimensions: int):
        self.model, self.task_type, self.dimensions = model, task_type, dimensions
        self.gemini = family_of(model).name == "gemini"

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

        A line with a non-empty ``status``, an ``error`` object, no embedding, or a vector that
        :func:`fit_vector` refuses is an error for its rows; only a line naming no row at all is None.
        """
        obj = json_object(raw)
        if obj is None:
            return None
        text = echoed_text(obj)
        key = self.key_of(obj, text)
        if key is None:
            return None
        return result_for((key,), obj, self.dimensions, renormalise=self.gemini,
                          characters=billable_characters(text) if text is not None else None)

    def key_of(self, obj: dict[str, Any], text: str | None = None) -> str | None:
        """The content hash a line answers: its ``key``, else a hash of the echoed text (``text``, when the
        caller has it already).

        The echoed text is hashed with the configured task type: batchd sends no other, and an echo that
        spells it differently (``taskType``, lower case) or leaves it out must still find its rows.
        """
        key = obj.get("key")
        if isinstance(key, str) and key:
            return key
        text = text if text is not None else echoed_text(obj)
        return self._hash(text) if text is not None else None

    def _hash(self, text: str) -> str:
        return content_hash(text, self.model, self.task_type, self.dimensions)


def echoed_text(obj: dict[str, Any]) -> str | None:
    """The input text a line echoes: a classic ``instance.content`` (or an errors-file line that is the bare
    instance), or a Gemini ``request``'s first part; None without one."""
    inst = obj.get("instance")
    if not isinstance(inst, dict) and isinstance(obj.get("content"), str):
        inst = obj  # an errors-file line that is the bare instance plus "error"
    if isinstance(inst, dict) and isinstance(inst.get("content"), str):
        return inst["content"]
    req = obj.get("request")
    if isinstance(req, dict):
        try:
            text = req["content"]["parts"][0]["text"]
        except (KeyError, IndexError, TypeError):
            return None
        return text if isinstance(text, str) else None
    return None


def json_object(raw: bytes) -> dict[str, Any] | None:
    """One output line as a JSON object, or None when it is not one (truncated, garbage, an array...)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def result_for(keys: tuple[str, ...], obj: dict[str, Any], dimensions: int, *, renormalise: bool,
               characters: int | None = None) -> ResultLine:
    """The ResultLine for an output object already tied to ``keys``: its error, or its fitted vector (with the
    billable ``characters`` of its text, when known)."""
    err = line_error(obj)
    if err is not None:
        return ResultLine(keys, error=err)
    emb = embedding_of(obj)
    if emb is None:
        return ResultLine(keys, error="no embedding in the result line")
    try:
        blob, cut = fit_vector(emb.values, dimensions, renormalise=renormalise)
    except VectorError as e:
        return ResultLine(keys, error=str(e)[:MAX_ERROR], token_count=emb.token_count)
    return ResultLine(keys, vector=blob, token_count=emb.token_count, truncated=emb.truncated,
                      answered_dims=len(emb.values), cut=cut, characters=characters)


def line_error(obj: dict[str, Any]) -> str | None:
    """The error a line reports, or None: an ``error`` object (message, else status, else code), an
    ``error`` string, or a non-empty ``status`` string."""
    err, status = obj.get("error"), obj.get("status")
    if isinstance(err, dict):
        msg = err.get("message") or err.get("status")
        if msg or err.get("code"):
            return str(msg or f"error code {err.get('code')}")[:MAX_ERROR]
    if isinstance(err, str) and err:
        return err[:MAX_ERROR]
    if isinstance(status, str) and status:
        return status[:MAX_ERROR]
    if isinstance(status, dict) and (status.get("message") or status.get("code")):  # a google.rpc.Status
        return str(status.get("message") or f"error code {status.get('code')}")[:MAX_ERROR]
    return None


def embedding_of(obj: dict[str, Any]) -> Embedding | None:
    """The embedding of a classic (``predictions[0]`` or ``prediction``) or Gemini (``response``) line."""
    preds = obj.get("predictions")
    pred = preds[0] if isinstance(preds, list) and preds else obj.get("prediction")
    if isinstance(pred, dict):
        emb = pred.get("embeddings")
        if isinstance(emb, dict) and isinstance(emb.get("values"), list):
            stats = emb.get("statistics")
            stats = stats if isinstance(stats, dict) else {}
            return Embedding(emb["values"], as_count(stats.get("token_count", stats.get("tokenCount"))),
                             stats.get("truncated") is True)
    resp = obj.get("response")
    if isinstance(resp, dict):
        return gemini_embedding(resp)
    return None


def gemini_embedding(resp: dict[str, Any]) -> Embedding | None:
    """A Gemini ``EmbedContentResponse`` as a dict: ``embedding.values`` (or the UNCONFIRMED
    ``embeddings[0].values``) and ``tokenCount`` (an int64: a JSON string), or None without values."""
    tokens = as_count(resp.get("tokenCount", resp.get("token_count")))
    emb = resp.get("embedding")
    if isinstance(emb, dict) and isinstance(emb.get("values"), list):
        return Embedding(emb["values"], tokens)
    embs = resp.get("embeddings")
    if isinstance(embs, list) and embs and isinstance(embs[0], dict) and isinstance(embs[0].get("values"), list):
        return Embedding(embs[0]["values"], tokens)
    return None


def as_count(value: Any) -> int | None:
    """A token count as JSON carries it: an int, an int64 string ("2"), or a whole float; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def embedding_values(obj: dict[str, Any]) -> tuple[list[Any] | None, int | None]:
    """(values, token_count) of a line, (None, None) without an embedding (see :func:`embedding_of`)."""
    emb = embedding_of(obj)
    return (emb.values, emb.token_count) if emb is not None else (None, None)


def float32_blob(values: list[Any]) -> bytes:
    """Little-endian float32, as sqlite-vec stores vectors. Raises TypeError for non-numbers."""
    vec = array("f", values)
    if sys.byteorder != "little":  # pragma: no cover - sqlite-vec blobs are little-endian
        vec.byteswap()
    return vec.tobytes()


__all__ = ["Embedding", "LineFormat", "as_count", "echoed_text", "embedding_of", "embedding_values", "float32_blob",
           "gemini_embedding", "json_object", "line_error", "result_for"]
