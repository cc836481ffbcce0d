"""Turning the numbers a service answers into the float32 blob sqlite-vec stores — the one place that decides
whether a vector is acceptable, and how a longer-than-asked vector is fitted to ``embedding.dimensions``.

Rules (every backend goes through :func:`fit_vector`):

- a value that is not a real number (a string, a bool, null), or that is not finite in float32 (NaN, ±inf,
  ``1e39``), makes the whole vector an error;
- a vector of zero length or zero norm is an error (cosine distance is undefined for it);
- a vector longer than asked is cut to its first ``dimensions`` values and renormalised to unit length:
  gemini-embedding-001 is Matryoshka-trained and Vertex batch jobs answer with the 3,072-value parent vector
  even when ``output_dimensionality`` is smaller (VERTEX.md, "what real jobs do");
- a vector shorter than asked is an error;
- ``renormalise=True`` also scales an exact-length vector to unit length (Gemini vectors smaller than 3,072 do
  not come normalised; queries and documents must compare on the same footing).

Pure functions: no I/O, no SQL.
"""

from __future__ import annotations

import math
import operator
import sys
from array import array
from collections.abc import Sequence
from itertools import repeat
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38
_NUMBER_TYPES = frozenset({float, int})
_ONE, _ZERO = array("f", [1.0]).tobytes(), bytes(4)  # float32 1.0 and 0.0 in this machine's byte order


class VectorError(ValueError):
    """The values cannot be stored as an embedding; the message says why (kept in ``error_message``)."""


def fit_vector(values: Sequence[Any], dimensions: int, *, renormalise: bool = False) -> tuple[bytes, bool]:
    """(little-endian float32 blob of ``dimensions`` values, whether the input was cut).

    Raises :class:`VectorError` for a vector that must never reach ``chunks_vec``.
    """
    n = len(values)
    if n == 0:
        raise VectorError("empty vector")
    if n < dimensions:
        raise VectorError(f"vector has {n} dimensions, expected {dimensions}")
    cut = n > dimensions
    vals = values[:dimensions] if cut else values
    # (C-level loops throughout: this runs once per output line, and a Python loop over 768 values cost more
    # than parsing the line's JSON.) array("f") refuses strings, None, lists and dicts itself.
    try:
        vec = array("f", vals)
    except OverflowError:
        raise VectorError("embedding values are not finite") from None
    except TypeError:
        raise VectorError("embedding values are not numbers") from None
    # bool is an int subclass that array("f") takes: JSON true must not become 1.0. A bool can only have become
    # the float32 1.0 or 0.0, so the exact check of every value's type (~30 µs) runs only for a vector holding
    # one of those bit patterns (found at any byte offset; a false hit only costs the exact check).
    # A cut vector's dropped values are checked too (every value of an answer must be a number).
    blob = vec.tobytes()
    if (cut or _ONE in blob or _ZERO in blob) and not set(map(type, values)) <= _NUMBER_TYPES:
        raise VectorError("embedding values are not numbers")
    if cut or renormalise:
        # The norm is finite exactly when every value is (1e39 became inf; float32 squares cannot overflow a
        # double).
        norm = math.hypot(*vec)
        if not math.isfinite(norm):
            raise VectorError("embedding values are not finite")
        if norm == 0.0:
            raise VectorError("vector has zero length (norm 0)")
        vec = array("f", map(operator.truediv, vec, repeat(norm, len(vec))))
    else:
        # The same two checks without the norm (half the cost on the hot path): a float32 sum of finite values
        # cannot overflow a double, so the sum is finite exactly when every value is; all zero is any() False.
        if not math.isfinite(sum(vec)):
            raise VectorError("embedding values are not finite")
        if not any(vec):
            raise VectorError("vector has zero length (norm 0)")
        if sys.byteorder == "little":
            return blob, cut
    if sys.byteorder != "little":  # pragma: no cover - sqlite-vec blobs are little-endian
        vec.byteswap()
    return vec.tobytes(), cut


__all__ = ["VectorError", "fit_vector"]
