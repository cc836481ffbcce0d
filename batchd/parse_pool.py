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

import collections
import contextlib
import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - not Unix
    fcntl = None  # type: ignore[assignment]
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog

from batchd.backends import BackendError, ResultLine
from batchd.parse_worker import HEADER, read_frame, write_frame

log = structlog.get_logger("batchd.parse_pool")

CHUNK_BYTES = 256 << 10  # bytes of whole lines per chunk sent to a worker (a few lines of 3,072 values)
PIPE_BYTES = 1 << 20  # pipe size asked for (fs.pipe-max-size allows 1 MiB to anyone by default)
IN_FLIGHT = 3  # chunks per worker sent and not yet answered
AUTO_MIN_TEXTS = 5_000  # "auto": a smaller batch is parsed in-process (starting workers, ~0.2 s, does not pay)
AUTO_MAX_WORKERS = 2
START_TIMEOUT = 60.0  # seconds for a worker to start and load its parser
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


def line_chunks(blocks: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[list[Any]]:
    """Whole lines as a list of buffers, pieces of about ``size`` bytes from a file's blocks. The last piece always
    ends with a newline (one is added to a file that does not end with one).

    No byte is copied or scanned here beyond finding each block's last newline (memoryview slices; the pipe write
    is the one copy): this process's CPU is shared with the workers, which count the lines."""
    parts: list[Any] = []
    have = 0
    for block in blocks:
        cut = block.rfind(b"\n") + 1
        if cut == 0 or have + cut < size:  # not enough whole lines yet: keep gathering
            parts.append(block)
            have += len(block)
            continue
        view = memoryview(block)
        parts.append(view[:cut])
        yield parts
        parts, have = ([view[cut:]], len(block) - cut) if cut < len(block) else ([], 0)
    if have:
        if bytes(parts[-1][-1:]) != b"\n":
            parts.append(b"\n")
        yield parts


class _LineNumbers:
    """File line numbers for the lines workers found malformed, from each chunk's line count: a malformed line
    is reported once the counts of every earlier chunk of its file are in (chunks come back out of order).

    Linear in the job: a file of nothing but garbage lines must not make numbering them quadratic."""

    def __init__(self, report: Callable[[str, int], None]):
        self._report = report
        # Per file: lines before each chunk, for the chunks whose earlier chunks are all counted; the counts that
        # came early; the malformed lines (chunk -> indexes) waiting for their chunk's start.
        self._starts: dict[str, list[int]] = {}
        self._early: dict[str, dict[int, int]] = {}
        self._pending: dict[str, dict[int, list[int]]] = {}

    def chunk_done(self, name: str, seq: int, lines: int, malformed: list[int]) -> None:
        starts = self._starts.setdefault(name, [0])
        early = self._early.setdefault(name, {})
        pending = self._pending.setdefault(name, {})
        early[seq] = lines
        if malformed:
            pending.setdefault(seq, []).extend(malformed)
        while len(starts) - 1 in early:  # the next chunk's start is now known
            starts.append(starts[-1] + early.pop(len(starts) - 1))
        for chunk in [c for c in pending if c < len(starts)]:
            for index in pending.pop(chunk):
                self._report(name, starts[chunk] + index + 1)


def _widen(pipe: Any) -> None:
    """Give a pipe room for a whole chunk (Linux: 64 KiB by default, up to fs.pipe-max-size, 1 MiB by default).

    With the default size, writing a chunk waits until the worker has read most of it, that is until it has
    parsed its previous chunk: meanwhile the other worker may run dry (measured: workers idle half the time)."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl else None
    if setsz is None or pipe is None:
        return  # pragma: no cover - not Linux
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), setsz, PIPE_BYTES)


class _Worker:
    def __init__(self, index: int, spec: str, results: queue.Queue[tuple[int, str, Any]]):
        self.index = index
        self.in_flight = 0
        self.sent: collections.deque[tuple[str, int]] = collections.deque()  # (file, chunk) awaiting an answer
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
        for pipe in (self.proc.stdin, self.proc.stdout):
            _widen(pipe)
        self.reader = threading.Thread(target=self._read, args=(results,), daemon=True,
                                       name=f"batchd-parse-reader-{index}")
        self.reader.start()

    def _read(self, results: queue.Queue[tuple[int, str, Any]]) -> None:
        assert self.proc.stdout is not None
        try:
            while (frame := read_frame(self.proc.stdout)) is not None:
                msg = pickle.loads(frame)  # our own child process, started above: trusted
                kind = "lines" if not isinstance(msg, dict) else "ready" if "ready" in msg else "stats"
                results.put((self.index, kind, msg))
            results.put((self.index, "end", None))
        except Exception as e:  # noqa: BLE001 - reported by the consumer as the worker's failure
            results.put((self.index, "broken", e))

    def send(self, name: str, seq: int, chunk: list[Any]) -> None:
        assert self.proc.stdin is not None
        f = self.proc.stdin
        write_frame(f, json.dumps({"file": name, "chunk": seq}).encode())
        f.write(sum(len(p) for p in chunk).to_bytes(HEADER, "little"))
        for part in chunk:
            f.write(part)
        f.flush()
        self.in_flight += 1
        self.sent.append((name, seq))

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
        self._numbers = _LineNumbers(on_malformed)
        self._chunk_bytes = chunk_bytes
        self._results: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self._workers: list[_Worker] = []
        self.peak_rss_kb = 0  # the largest worker's peak RSS, once they finished

    def __enter__(self) -> ParsePool:
        """Start the workers and wait until each has loaded its parser (up to START_TIMEOUT): a worker that cannot
        start (an interpreter or a sandbox that refuses it, a parser that does not import) is a BackendError
        here, before any output was read, so the caller can parse in its own process instead."""
        try:
            for i in range(self._n):
                self._workers.append(_Worker(i, self._spec, self._results))
            ready = 0
            deadline = time.monotonic() + START_TIMEOUT
            while ready < self._n:
                try:
                    index, kind, msg = self._results.get(timeout=WAIT_TICK)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise BackendError(f"parse workers did not start within {START_TIMEOUT:.0f} s") from None
                    self._wait()
                    continue
                if kind != "ready":
                    raise self._workers[index].failure("could not start")
                ready += 1
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
            for seq, chunk in enumerate(line_chunks(blocks, self._chunk_bytes)):
                w = min(self._workers, key=lambda x: x.in_flight)
                while w.in_flight >= IN_FLIGHT:
                    yield from self._take(block=True)
                    w = min(self._workers, key=lambda x: x.in_flight)
                try:
                    w.send(name, seq, chunk)
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
        log.debug("parse.workers_done", workers=self._n, peak_rss_mb=round(self.peak_rss_kb / 1024, 1))

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
        rows, malformed, lines = msg
        name, seq = w.sent.popleft()
        self._numbers.chunk_done(name, seq, lines, malformed)
        return [ResultLine(*row) for row in rows]


__all__ = ["AUTO_MIN_TEXTS", "CHUNK_BYTES", "ParsePool", "line_chunks", "worker_count"]
