"""How the Vertex backend writes input lines and reads output lines of both families (VERTEX.md), including
the UNCONFIRMED variants and broken lines."""

from __future__ import annotations

from array import array

import orjson
import pytest

from batchd.backends import Item, ResultLine, content_hash
from batchd.backends.vertex_lines import LineFormat
from batchd.config import from_dict

DIMS = 4
VALUES = [0.5, -0.25, 1.0, 0.0]
BLOB = array("f", VALUES).tobytes()


def backend(model: str) -> LineFormat:
    return LineFormat(model, "RETRIEVAL_DOCUMENT", DIMS)


def key(text: str, model: str = "text-embedding-005", task: str = "RETRIEVAL_DOCUMENT") -> str:
    return content_hash(text, model, task, DIMS)


def line(obj: object) -> bytes:
    return orjson.dumps(obj)


CLASSIC_OK = {"instance": {"content": "hi", "task_type": "RETRIEVAL_DOCUMENT"},
              "predictions": [{"embeddings": {"statistics": {"token_count": 3, "truncated": False},
                                              "values": VALUES}}], "status": ""}


def test_classic_success_maps_by_echoed_content() -> None:
    assert backend("text-embedding-005").parse(line(CLASSIC_OK)) == ResultLine((key("hi"),), BLOB, None, 3)


def test_classic_echo_without_task_type_uses_the_configured_one() -> None:
    obj = dict(CLASSIC_OK, instance={"content": "hi"})
    assert backend("text-embedding-005").parse(line(obj)).keys == (key("hi"),)


@pytest.mark.parametrize("obj, error", [
    ({"instance": {"content": "hi"}, "predictions": [], "status": "quota"}, "quota"),
    ({"instance": {"content": "hi"}, "error": {"code": 3, "message": "bad input"}}, "bad input"),
    ({"instance": {"content": "hi"}, "error": {"code": 13}}, "error code 13"),
    ({"instance": {"content": "hi"}, "predictions": [], "status": ""}, "no embedding in the result line"),
    (dict(CLASSIC_OK, predictions=[{"embeddings": {"values": [1.0, 2.0]}}]), "vector has 2 dimensions, expected 4"),
    (dict(CLASSIC_OK, predictions=[{"embeddings": {"values": ["a", "b", "c", "d"]}}]),
     "embedding values are not numbers"),
])
def test_classic_failed_lines(obj: dict, error: str) -> None:
    r = backend("text-embedding-005").parse(line(obj))
    assert r == ResultLine((key("hi"),), None, error)


GEMINI_REQ = {"content": {"parts": [{"text": "hi"}]},
              "embed_content_config": {"task_type": "RETRIEVAL_DOCUMENT", "output_dimensionality": DIMS}}


@pytest.mark.parametrize("response", [
    {"embedding": {"values": VALUES}},
    {"embeddings": [{"values": VALUES}]},  # the UNCONFIRMED alternative shape
])
def test_gemini_success_maps_by_key(response: dict) -> None:
    obj = {"key": "k1", "request": GEMINI_REQ, "response": response, "status": ""}
    assert backend("gemini-embedding-001").parse(line(obj)) == ResultLine(("k1",), BLOB)


def test_gemini_without_key_falls_back_to_the_request_text() -> None:
    obj = {"request": GEMINI_REQ, "response": {"embedding": {"values": VALUES}}}
    r = backend("gemini-embedding-001").parse(line(obj))
    assert r.keys == (key("hi", "gemini-embedding-001"),) and r.vector == BLOB


def test_gemini_failed_line() -> None:
    obj = {"key": "k1", "request": GEMINI_REQ, "status": "RESOURCE_EXHAUSTED"}
    assert backend("gemini-embedding-001").parse(line(obj)) == ResultLine(("k1",), None, "RESOURCE_EXHAUSTED")


@pytest.mark.parametrize("raw", [b'{"instance": {"content": "tru', b"[1, 2]", b'{"status": ""}', b"null",
                                 b'{"request": {"content": {"parts": []}}}'])
def test_malformed_lines_are_none(raw: bytes) -> None:
    assert backend("text-embedding-005").parse(raw) is None


def test_retry_settings_are_validated() -> None:
    from batchd.config import ConfigError

    cfg = from_dict({"vertex": {"retry_backoff": "250ms", "retry_deadline": "2m"}})
    assert (cfg.vertex.retry_backoff, cfg.vertex.retry_deadline) == (0.25, 120)
    with pytest.raises(ConfigError, match="vertex.retry_backoff: 10s is longer than vertex.retry_deadline"):
        from_dict({"vertex": {"retry_backoff": "10s", "retry_deadline": "5s"}})
    with pytest.raises(ConfigError, match="vertex.retry_deadline: must be greater than zero"):
        from_dict({"vertex": {"retry_deadline": 0}})


def test_input_lines() -> None:
    item = Item("k1", "héllo \"world\"\n")
    assert orjson.loads(backend("text-embedding-005").input_line(item)) == \
        {"content": item.text, "task_type": "RETRIEVAL_DOCUMENT"}
    raw = backend("gemini-embedding-001").input_line(item)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert orjson.loads(raw) == {"key": "k1", "request": {
        "content": {"parts": [{"text": item.text}]},
        "embed_content_config": {"task_type": "RETRIEVAL_DOCUMENT", "output_dimensionality": DIMS}}}
