"""A result-parsing worker process: raw output lines in, parsed :class:`~batchd.backends.ResultLine` fields out.

Started by :mod:`batchd.parse_pool` as ``python -m batchd.parse_worker SPEC`` (a subprocess module, never
``multiprocessing``: spawn re-imports the parent's ``__main__`` — an embedding application's unguarded code — and
fork is unsafe with the daemon's threads and client sockets). ``SPEC`` is JSON: ``{"parser": "module:Class",
"kwargs": {...}}``; ``Class(**kwargs).parse(raw_line)`` returns a ResultLine, or None for a line tied to no row.

Protocol (both directions: 8-byte little-endian length, then that many bytes):
  in   a header frame ``{"file": name, "chunk": its number in the file}`` (JSON, for the reader of a dump), then
       the chunk: whole lines, newline-terminated. End of input = end of stdin.
  out  first ``{"ready": true}`` once the parser is loaded; then per chunk, in the order received, a pickle of
       :func:`parse_chunk`'s ``(tuples, malformed, lines)``. Last, a pickle of ``{"peak_rss_kb": ...}``.
The worker holds no database, no credentials and no network connection; it only computes. Anything it prints
goes to stderr (file descriptor 1 is moved away for the frames), which the parent keeps for its error message.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

HEADER = 8


def read_frame(f: BinaryIO) -> bytes | None:
    """The next frame, or None at a clean end of input. Raises EOFError on a frame cut short."""
    head = f.read(HEADER)
    if not head:
        return None
    if len(head) != HEADER:
        raise EOFError("frame header cut short")
    n = int.from_bytes(head, "little")
    data = f.read(n)
    if len(data) != n:
        raise EOFError("frame cut short")
    return data


def write_frame(f: BinaryIO, data: bytes) -> None:
    f.write(len(data).to_bytes(HEADER, "little"))
    f.write(data)


def load_parser(spec: dict[str, Any]) -> Any:
    module, _, attr = spec["parser"].partition(":")
    return getattr(importlib.import_module(module), attr)(**spec.get("kwargs", {}))


def parse_chunk(parser: Any, chunk: bytes) -> tuple[list[tuple], list[int], int]:
    """Parse the whole lines of ``chunk``: (one tuple of ResultLine fields per non-empty line, the 0-based
    indexes of the lines that named no row, the number of lines). The parent turns indexes into file line
    numbers from the chunks' line counts, so it never scans the bytes itself (~0.4 s of its CPU per 500 MB)."""
    out: list[tuple] = []
    malformed: list[int] = []
    parse = parser.parse
    lines = chunk.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk ends with a newline
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        r = parse(raw)
        if r is None:
            malformed.append(index)
            out.append(((), None, "an output line tied to no row", None, False, None, False, None))
        else:
            out.append((r.keys, r.vector, r.error, r.token_count, r.truncated, r.answered_dims, r.cut, r.characters))
    return out, malformed, len(lines)


def _peak_rss_kb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        pass
    return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers itself
    frames = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)  # a stray print must never corrupt the frames
    parser = load_parser(json.loads(argv[1]))
    write_frame(frames, pickle.dumps({"ready": True}, protocol=5))  # started: the parent may send
    frames.flush()
    stdin = sys.stdin.buffer
    while True:
        head = read_frame(stdin)
        if head is None:
            break
        chunk = read_frame(stdin)
        if chunk is None:
            raise EOFError("a chunk header without its chunk")
        write_frame(frames, pickle.dumps(parse_chunk(parser, chunk), protocol=5))
        frames.flush()
    write_frame(frames, pickle.dumps({"peak_rss_kb": _peak_rss_kb()}, protocol=5))
    frames.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
