"""Parsing a finished job's output in worker processes, while this process downloads and spools.

Parsing is most of a sync's CPU (JSON decoding and packing each vector, ~70-100 µs per 768-value line). A backend
that can hand over its output as raw bytes (:class:`batchd.backends.RawResults`) has it parsed here by
``python -m batchd.parse_worker`` processes (why not ``multiprocessing``: see that module), fed whole-line chunks
round-robin; this process only reads the bytes, cuts them at newlines and writes the parsed lines into the spool,
so on two cores the parse runs beside the download and the spool writes instead of after them.

Bounded: at most IN_FLIGHT chunks per worker are queued or being parsed, so memory does not grow with the job.
Order: lines come back in no particular order (the spool is keyed by text, so order never mattered). Failure: a
worker that dies or cannot start is a :class:`BackendError` naming its last stderr line (the batch is deferred,
like any read that failed); the workers are killed on every way out, including ``Stopped`` (SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from batchd.backends import BackendError, ResultLine
from batchd.parse_worker import read_frame, write_frame

CHUNK_BYTES = 1 << 20  # bytes of whole lines per chunk sent to a worker
IN_FLIGHT = 3  # chunks per worker sent and not yet answered
AUTO_MIN_TEXTS = 5_000  # "auto": a smaller batch is parsed in-process (starting workers, ~0.2 s, does not pay)
AUTO_MAX_WORKERS = 2
WAIT_TICK = 1.0  # seconds between calls of ``wait`` while blocked on the workers (watchdog, stop requests)


def worker_count(setting: str | int, texts: int) -> int:
    """How many parse workers for a batch of ``texts`` texts: ``daemon.parse_workers`` is "auto" (up to two,
    on a machine with two or more CPUs, for batches of AUTO_MIN_TEXTS texts or more), or a number (0: none)."""
    if setting == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return min(AUTO_MAX_WORKERS, cpus) if cpus >= 2 and texts >= AUTO_MIN_TEXTS else 0
    return int(setting)


def line_chunks(blocks: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, whole lines) pieces of about ``size`` bytes from a file's blocks. The last
    piece always ends with a newline (one is added to a file that does not end with one)."""
    parts: list[bytes] = []
    have = 0
    first = 1
    for block in blocks:
        parts.append(block)
        have += len(block)
        if have < size:
            continue
        data = b"".join(parts)
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one line longer than size: keep gathering
            parts, have = [data], len(data)
            continue
        piece = data[:cut]
        yield first, piece
        first += piece.count(b"\n")
        rest = data[cut:]
        parts, have = ([rest], len(rest)) if rest else ([], 0)
    if have:
        data = b"".join(parts)
        yield first, data if data.endswith(b"\n") else data + b"\n"


class _Worker:
    def __init__(self, index: int, spec: str, results: queue.Queue[tuple[int, str, Any]]):
        self.index = index
        self.in_flight = 0
        self.peak_rss_kb = 0
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # batchd importable as the parent imported it
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "batchd.parse_worker", spec], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.stderr, env=env, close_fds=True)
        except OSError as e:
            self.stderr.close()
            raise BackendError(f"cannot start a parse worker: {e}") from None
        self.reader = threading.Thread(target=self._read, args=(results,), daemon=True,
                                       name=f"batchd-parse-reader-{index}")
        self.reader.start()

    def _read(self, results: queue.Queue[tuple[int, str, Any]]) -> None:
        assert self.proc.stdout is not None
        try:
            while (frame := read_frame(self.proc.stdout)) is not None:
                msg = pickle.loads(frame)  # our own child process, started above: trusted
                results.put((self.index, "stats" if isinstance(msg, dict) else "lines", msg))
            results.put((self.index, "end", None))
        except Exception as e:  # noqa: BLE001 - reported by the consumer as the worker's failure
            results.put((self.index, "broken", e))

    def send(self, name: str, first: int, chunk: bytes) -> None:
        assert self.proc.stdin is not None
        write_frame(self.proc.stdin, json.dumps({"file": name, "line": first}).encode())
        write_frame(self.proc.stdin, chunk)
        self.proc.stdin.flush()
        self.in_flight += 1

    def finish_input(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def failure(self, what: str) -> BackendError:
        """The worker's failure as one line: its exit status and the last line it wrote to stderr."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read()[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
        code = self.proc.returncode
        status = f"exit status {code}" if code is not None and code >= 0 else \
            f"killed by signal {-code}" if code is not None else "still running"
        return BackendError(f"parse worker {what} ({status})" + (f": {tail[-1].strip()}" if tail else ""))

    def kill(self) -> None:
        self.finish_input()
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self.reader.join(timeout=5)
        self.stderr.close()


class ParsePool:
    """``with ParsePool(spec, n, wait) as pool: for line in pool.lines(files): ...``

    ``spec`` is the backend's :meth:`~batchd.backends.RawResults.line_parser` (``"module:Class"``, kwargs);
    ``wait()`` runs at least every WAIT_TICK seconds while this process waits on the workers (feed the watchdog,
    raise ``Stopped``); ``on_malformed(file, line)`` for each line that named no row.
    """

    def __init__(self, spec: tuple[str, dict[str, Any]], workers: int, wait: Callable[[], None] = lambda: None,
                 on_malformed: Callable[[str, int], None] = lambda f, n: None, chunk_bytes: int = CHUNK_BYTES):
        if workers < 1:
            raise ValueError("a ParsePool needs at least one worker")
        self._spec = json.dumps({"parser": spec[0], "kwargs": spec[1]})
        self._n = workers
        self._wait = wait
        self._on_malformed = on_malformed
        self._chunk_bytes = chunk_bytes
        self._results: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self._workers: list[_Worker] = []
        self.peak_rss_kb = 0  # the largest worker's peak RSS, once they finished

    def __enter__(self) -> ParsePool:
        try:
            for i in range(self._n):
                self._workers.append(_Worker(i, self._spec, self._results))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every worker (idempotent): after the end of input they have exited already."""
        for w in self._workers:
            w.kill()

    def lines(self, files: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[ResultLine]:
        """Every parsed line of ``files`` ((name, blocks) pairs, read in this process)."""
        for name, blocks in files:
            for first, chunk in line_chunks(blocks, self._chunk_bytes):
                w = min(self._workers, key=lambda x: x.in_flight)
                while w.in_flight >= IN_FLIGHT:
                    yield from self._take(block=True)
                    w = min(self._workers, key=lambda x: x.in_flight)
                try:
                    w.send(name, first, chunk)
                except OSError:  # a broken pipe: the worker died
                    raise w.failure("failed") from None
                yield from self._take(block=False)
        for w in self._workers:
            w.finish_input()
        ended = 0
        while ended < self._n:
            for kind, line in self._take_until_end():
                if kind == "end":
                    ended += 1
                else:
                    yield line
        self.peak_rss_kb = max((w.peak_rss_kb for w in self._workers), default=0)

    def _take_until_end(self) -> Iterator[tuple[str, Any]]:
        index, kind, msg = self._get(block=True)
        if kind == "end":
            w = self._workers[index]
            if w.proc.wait() != 0 or w.in_flight:
                raise w.failure("failed")
            yield "end", None
            return
        yield from (("line", x) for x in self._handle(index, kind, msg))

    def _take(self, *, block: bool) -> Iterator[ResultLine]:
        item = self._get(block=block)
        while item is not None:
            index, kind, msg = item
            if kind == "end":  # output ended while input is still being sent: it died
                raise self._workers[index].failure("failed")
            yield from self._handle(index, kind, msg)
            item = self._get(block=False)

    def _get(self, *, block: bool) -> Any:
        while True:
            try:
                return self._results.get(block=block, timeout=WAIT_TICK if block else None)
            except queue.Empty:
                if not block:
                    return None
                self._wait()

    def _handle(self, index: int, kind: str, msg: Any) -> list[ResultLine]:
        w = self._workers[index]
        if kind == "broken":
            raise w.failure(f"sent a broken answer ({msg})")
        if kind == "stats":
            w.peak_rss_kb = int(msg.get("peak_rss_kb", 0))
            return []
        w.in_flight -= 1
        rows, malformed = msg
        for name, lineno in malformed:
            self._on_malformed(name, lineno)
        return [ResultLine(*row) for row in rows]


__all__ = ["AUTO_MIN_TEXTS", "CHUNK_BYTES", "ParsePool", "line_chunks", "worker_count"]
