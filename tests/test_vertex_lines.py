"""How the Vertex backend writes input lines and reads output lines of both families (VERTEX.md), including
the UNCONFIRMED variants and broken lines."""

from __future__ import annotations

import math
import re
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
    assert backend("text-embedding-005").parse(line(CLASSIC_OK)) == ResultLine((key("hi"),), BLOB, None, 3, answered_dims=4,
                                                                               characters=2)


@pytest.mark.parametrize("obj, characters", [
    ({"instance": {"content": " a b\n\tc\u00a0d "}}, 4),  # white space is not billed (str.isspace)
    ({"key": "k1", "request": {"content": {"parts": [{"text": "é é"}]}}}, 2),
    ({"key": "k1"}, None),  # a line that echoes no text (the Gemini API's): the store counts from the chunk
])
def test_a_line_carries_the_billable_characters_of_the_text_it_echoes(obj: dict, characters: int | None) -> None:
    model = "text-embedding-005" if "instance" in obj else "gemini-embedding-001"
    response = {"response": {"embedding": {"values": VALUES}}} if "key" in obj else \
        {"predictions": [{"embeddings": {"values": VALUES}}]}
    assert backend(model).parse(line({**obj, **response})).characters == characters


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
    assert (r.keys, r.vector, r.error) == ((key("hi"),), None, error)


GEMINI_REQ = {"content": {"parts": [{"text": "hi"}]},
              "embed_content_config": {"task_type": "RETRIEVAL_DOCUMENT", "output_dimensionality": DIMS}}


def unit(values: list[float]) -> bytes:
    vec = array("f", values)
    norm = math.hypot(*vec)
    return array("f", [v / norm for v in vec]).tobytes()


@pytest.mark.parametrize("response", [
    {"embedding": {"values": VALUES}},
    {"embeddings": [{"values": VALUES}]},  # the UNCONFIRMED alternative shape
])
def test_gemini_success_maps_by_key(response: dict) -> None:
    """A Gemini vector smaller than 3,072 does not come normalised: batchd renormalises it."""
    obj = {"key": "k1", "request": GEMINI_REQ, "response": response, "status": ""}
    assert backend("gemini-embedding-001").parse(line(obj)) == ResultLine(("k1",), unit(VALUES), answered_dims=4,
                                                                          characters=2)


def test_gemini_without_key_falls_back_to_the_request_text() -> None:
    obj = {"request": GEMINI_REQ, "response": {"embedding": {"values": VALUES}}}
    r = backend("gemini-embedding-001").parse(line(obj))
    assert r.keys == (key("hi", "gemini-embedding-001"),) and r.vector == unit(VALUES)


def test_gemini_parent_vector_is_cut_and_renormalised() -> None:
    """Vertex batch answers the 3,072-value parent vector for a smaller output_dimensionality (issue 10.1)."""
    parent = [0.01 * ((i % 7) - 3) for i in range(3072)]
    parent[:4] = [0.3, -0.4, 0.0, 0.0]
    obj = {"key": "k1", "request": GEMINI_REQ, "response": {"tokenCount": "2", "embedding": {"values": parent}}}
    r = backend("gemini-embedding-001").parse(line(obj))
    assert r.error is None and r.cut and r.answered_dims == 3072
    assert r.vector == array("f", [0.6, -0.8, 0.0, 0.0]).tobytes()
    assert r.token_count == 2  # an int64 tokenCount arrives as a JSON string (issue 10.4)


def test_classic_longer_vector_is_cut_and_renormalised_exact_length_kept() -> None:
    obj = dict(CLASSIC_OK, predictions=[{"embeddings": {"values": [3.0, 0.0, 0.0, 4.0, 9.0, 9.0]}}])
    r = backend("text-embedding-005").parse(line(obj))
    assert r.cut and r.vector == array("f", [0.6, 0.0, 0.0, 0.8]).tobytes()
    assert backend("text-embedding-005").parse(line(CLASSIC_OK)).vector == BLOB  # classic: kept as answered


@pytest.mark.parametrize("values, error", [
    ([1e39, 0.0, 0.0, 0.0], "embedding values are not finite"),
    ([True, False, True, True], "embedding values are not numbers"),
    ([0.0, 0.0, 0.0, 0.0], "vector has zero length (norm 0)"),
    ([None, 1.0, 1.0, 1.0], "embedding values are not numbers"),
    ([], "empty vector"),
])
@pytest.mark.parametrize("model", ["text-embedding-005", "gemini-embedding-001"])
def test_odd_vectors_are_error_lines(values: list, error: str, model: str) -> None:
    """Issue 9 item 8: never stored as +inf, 1.0s or zeros."""
    if model.startswith("gemini"):
        obj = {"key": key("hi"), "request": GEMINI_REQ, "response": {"embedding": {"values": values}}}
    else:
        obj = dict(CLASSIC_OK, predictions=[{"embeddings": {"values": values}}])
    r = backend(model).parse(line(obj))
    assert r.vector is None and r.error == error and r.keys == (key("hi"),)


def test_truncated_statistics_and_token_counts() -> None:
    stats = {"token_count": "2048", "truncated": True}
    obj = dict(CLASSIC_OK, predictions=[{"embeddings": {"statistics": stats, "values": VALUES}}])
    r = backend("text-embedding-005").parse(line(obj))
    assert r.truncated and r.token_count == 2048
    assert not backend("text-embedding-005").parse(line(CLASSIC_OK)).truncated


@pytest.mark.parametrize("obj, error", [
    # an errors-file line that is the bare instance plus "error"
    ({"content": "hi", "task_type": "RETRIEVAL_DOCUMENT", "error": {"code": 3, "message": "bad"}}, "bad"),
    # an error with only a status
    ({"instance": {"content": "hi"}, "error": {"status": "INVALID_ARGUMENT"}}, "INVALID_ARGUMENT"),
    ({"instance": {"content": "hi"}, "status": {"code": 8, "message": "quota"}}, "quota"),
])
def test_alternative_error_shapes(obj: dict, error: str) -> None:
    assert backend("text-embedding-005").parse(line(obj)) == ResultLine((key("hi"),), None, error)


def test_singular_prediction_object() -> None:
    obj = {"instance": {"content": "hi"}, "prediction": {"embeddings": {"values": VALUES}}}
    assert backend("text-embedding-005").parse(line(obj)).vector == BLOB


@pytest.mark.parametrize("instance", [
    {"content": "hi", "task_type": "retrieval_document"},
    {"content": "hi", "taskType": "RETRIEVAL_DOCUMENT"},
    {"content": "hi", "task_type": "RETRIEVAL_QUERY"},
])
def test_echoed_task_type_spelling_never_changes_the_key(instance: dict) -> None:
    """Hash with the configured task type (the only one sent), never with an echoed spelling."""
    obj = dict(CLASSIC_OK, instance=instance)
    assert backend("text-embedding-005").parse(line(obj)).keys == (key("hi"),)


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


@pytest.mark.parametrize("values, error", [
    ([math.nan, 1.0, 1.0, 1.0], "embedding values are not finite"),
    ([1.0, math.inf, 1.0, 1.0], "embedding values are not finite"),
    ([math.inf, -math.inf, 0.0, 0.0], "embedding values are not finite"),  # sums to nan, not to 0
    ([3.4e38, 3.4e38, 3.4e38, 3.4e38], None),  # huge but finite float32: the sum must not overflow
    ([0.0, -0.0, 0.0, 0.0], "vector has zero length (norm 0)"),
    ([1e-45, 0.0, 0.0, 0.0], None),  # the smallest float32 subnormal is not zero
])
@pytest.mark.parametrize("renormalise", [False, True])
def test_fit_vector_non_finite_and_zero_on_both_paths(values: list, error: str | None, renormalise: bool) -> None:
    """A local model (numpy) can hand over NaN and infinities that JSON cannot carry; the fast path without a
    norm (exact-length, not renormalised) must refuse exactly what the norm path refuses."""
    from batchd.vectors import VectorError, fit_vector

    if error is None:
        blob, cut = fit_vector(values, 4, renormalise=renormalise)
        assert len(blob) == 16 and not cut
    else:
        with pytest.raises(VectorError, match=re.escape(error)):
            fit_vector(values, 4, renormalise=renormalise)


@pytest.mark.parametrize("values", [
    [0.5, True, 0.5, 0.5], [0.5, 0.5, 0.5, False], [0.5, 0.5, 0.5, "0.5"], [0.5, [0.5], 0.5, 0.5],
    [0.5, 0.5, 0.5, {"v": 1}],
])
@pytest.mark.parametrize("extra", [[], [0.5, True], [0.5, "x"]])  # equal length, and cut from 6 to 4
def test_fit_vector_refuses_every_non_number_even_in_a_cut_tail(values: list, extra: list) -> None:
    """The cheap check (the float32 bit patterns a bool can become) must never let a bool through; a cut
    vector's dropped values are checked too."""
    from batchd.vectors import VectorError, fit_vector

    with pytest.raises(VectorError, match="not numbers"):
        fit_vector(values + extra, 4)
    if extra and any(not isinstance(v, float) for v in extra):
        with pytest.raises(VectorError, match="not numbers"):
            fit_vector([0.5, 0.5, 0.5, 0.5] + extra, 4)


def test_fit_vector_keeps_exact_ones_zeros_and_integers() -> None:
    """1.0, 0.0 and JSON integers (proto3 JSON writes 0 for a zero float) are numbers: the slow check passes."""
    from batchd.vectors import fit_vector

    blob, cut = fit_vector([1.0, 0.0, 0, 1], 4)
    assert blob == array("f", [1.0, 0.0, 0.0, 1.0]).tobytes() and not cut
