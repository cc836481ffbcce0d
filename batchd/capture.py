"""The daemon's own file descriptors 1 and 2: every line written to them becomes a JSON event.

Under systemd, stdout and stderr are the journal, and ``journalctl -o cat | jq .`` must parse every line. batchd's
own events are JSON, but C libraries write to fd 1/2 directly (PyTorch's cpuinfo: ``Error in cpuinfo: failed to
parse processor information from /proc/cpuinfo``), as do Python modules that ``print``. :class:`OutputCapture`
moves the real stdout to a new descriptor for the log handler, points fd 1 and fd 2 at two pipes, and a reader
thread per pipe turns each line into a ``foreign.output`` warning event (``stream``: stdout or stderr,
``message``: the line, cut at 4,000 characters). The events go through the ordinary logging pipeline, so they
carry the journal priority prefix and a timestamp like every other line.

Only :func:`batchd.cli.run` uses it, and only when the logs are JSON (not on a terminal, where the lines are
readable as they are and a progress bar writes to stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import TextIO

import structlog

log = structlog.get_logger("batchd.output")

MAX_LINE = 4_000  # characters of one foreign line kept in the event
_READ = 65_536


class OutputCapture:
    """Redirect fd 1 and fd 2 through pipes into ``foreign.output`` events. ``start()`` once, ``stop()`` once."""

    def __init__(self) -> None:
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []
        self.stream: TextIO | None = None
        self.lines = 0
        self._stopped = False

    def start(self) -> TextIO:
        """Begin capturing; return a line-buffered text stream on the original stdout for the log handler."""
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                s.flush()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            self._saved[fd] = os.dup(fd)
            os.set_inheritable(self._saved[fd], False)
            r, w = os.pipe()
            os.dup2(w, fd)  # fd 1/2 now write into the pipe; the original lives on in _saved[fd]
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, name), name=f"batchd-capture-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.stream = open(self._saved[1], "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        return self.stream

    @property
    def log_fd(self) -> int:
        """The descriptor log lines must be written to (the original stdout), also from a signal handler."""
        return self._saved.get(1, 1)

    def stop(self, timeout: float = 2.0) -> None:
        """Put the original fd 1/2 back; wait (a little) for the readers to log what is left in the pipes."""
        if not self._saved or self._stopped:
            return
        self._stopped = True
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                s.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipe's last write end: its reader sees EOF
        for t in self._threads:
            t.join(timeout)
        if self.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.flush()
        # The saved descriptors stay open: the log handler still writes there, and a daemon thread may log a
        # last line while the process exits.

    def _pump(self, fd: int, stream: str) -> None:
        buf = b""
        try:
            while True:
                data = os.read(fd, _READ)
                if not data:
                    break
                buf += data
                while True:
                    line, sep, rest = buf.partition(b"\n")
                    if not sep:
                        break
                    buf = rest
                    self._emit(line, stream)
                if len(buf) > 4 * MAX_LINE:  # a writer that never ends its line: emit what is there
                    self._emit(buf, stream)
                    buf = b""
            if buf:
                self._emit(buf, stream)
        finally:
            os.close(fd)

    def _emit(self, raw: bytes, stream: str) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        self.lines += 1
        log.warning("foreign.output", stream=stream, message=text[:MAX_LINE],
                    **({"truncated_chars": len(text)} if len(text) > MAX_LINE else {}))


__all__ = ["OutputCapture"]
