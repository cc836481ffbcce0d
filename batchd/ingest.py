"""Reading chunks to enqueue from JSON Lines: ``{"id": 17, "text": "..."}`` per line (id optional)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import orjson

ID_MIN, ID_MAX = -(2**63), 2**63 - 1  # what SQLite can store in an INTEGER PRIMARY KEY


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str


def read_jsonl(stream: BinaryIO, on_reject: Callable[[Rejected], None]) -> Iterator[tuple[int | None, str]]:
    """Yield (id or None, text) for every good line; report each bad line through ``on_reject``.

    A bad line is: not JSON, not an object, no "text", text not a string or empty, or an id that is not an
    integer (or outside SQLite's 64-bit range). Blank lines are ignored. Reading never stops at a bad line.
    """
    for _, cid, text in read_jsonl_numbered(stream, on_reject):
        yield cid, text


def read_jsonl_numbered(stream: BinaryIO, on_reject: Callable[[Rejected], None]
                        ) -> Iterator[tuple[int, int | None, str]]:
    """:func:`read_jsonl` with each good line's number: (line, id or None, text)."""
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            on_reject(Rejected(number, f"not valid JSON ({str(e).split(':')[0]})"))
            continue
        if not isinstance(obj, dict):
            on_reject(Rejected(number, "not a JSON object"))
            continue
        text = obj.get("text")
        if text is None:
            on_reject(Rejected(number, 'no "text" field'))
            continue
        if not isinstance(text, str):
            on_reject(Rejected(number, '"text" is not a string'))
            continue
        if not text.strip():
            on_reject(Rejected(number, '"text" is empty'))
            continue
        cid = obj.get("id")
        if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)):
            on_reject(Rejected(number, '"id" is not an integer'))
            continue
        if cid is not None and not ID_MIN <= cid <= ID_MAX:
            on_reject(Rejected(number, '"id" is out of range (SQLite ids are 64-bit signed integers)'))
            continue
        yield number, cid, text
