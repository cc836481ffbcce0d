"""systemd integration: sd_notify messages (through ``sdnotify``) and the watchdog thread.

Without ``$NOTIFY_SOCKET`` every call here is silently a no-op, so the daemon runs the same way in a
terminal, under cron, in a container or under systemd.

The watchdog follows the litestream rule: the heartbeat is sent only while work is actually progressing.
The worker calls :meth:`Health.begin` when a step starts, :meth:`Health.progress` at every slice
boundary (per uploaded block, per applied result slice) and :meth:`Health.end` when the step is over.
A worker that is idle between steps is healthy; a worker inside a step that has not reported progress
for a whole watchdog interval is not, and the pings stop so that systemd kills and restarts it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import sdnotify
import structlog

log = structlog.get_logger("batchd.systemd")


class Notifier:
    """Sends sd_notify(3) messages. ``enabled`` is False (and every call a no-op) without $NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.socket = env.get("NOTIFY_SOCKET", "")
        self.enabled = bool(self.socket)
        self._lock = threading.Lock()
        self._n = _connect(self.socket) if self.enabled else None

    def send(self, *assignments: str) -> None:
        """Send one datagram of newline-separated ``KEY=value`` assignments. Never raises."""
        if self._n is None:
            return
        message = "\n".join(assignments)
        with self._lock:  # the worker and the watchdog thread share one socket
            self._n.notify(message)

    def close(self) -> None:
        with self._lock:
            sock = getattr(self._n, "socket", None)
            if sock is not None:
                sock.close()
            self._n = None

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}", *([_status(status)] if status else []))

    def status(self, text: str) -> None:
        self.send(_status(text))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([_status(status)] if status else []))


def _connect(address: str) -> sdnotify.SystemdNotifier:
    notifier = sdnotify.SystemdNotifier()  # connects to $NOTIFY_SOCKET itself; never raises
    if os.environ.get("NOTIFY_SOCKET") != address:  # an explicit environment was passed in
        if notifier.socket is not None:
            notifier.socket.close()
        sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect("\0" + address[1:] if address.startswith("@") else address)  # type: ignore[union-attr]
        except OSError:
            sock.close()  # type: ignore[union-attr]
            sock = None
        notifier.socket = sock
    return notifier


def _status(text: str) -> str:
    # sdnotify encodes latin-1 and a newline would end the assignment.
    clean = " ".join(text.split())
    return "STATUS=" + clean.encode("latin-1", "replace").decode("latin-1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds of ``$WATCHDOG_USEC`` when the watchdog is meant for this process, else None.

    Like sd_watchdog_enabled(3): ignored when ``$WATCHDOG_PID`` names another process (a child that
    inherited the environment must not ping on its parent's behalf).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "") or 0)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1_000_000


class Health:
    """What the worker reports about itself; read by the watchdog thread. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._step: str | None = None
        self._last = clock()

    def begin(self, step: str) -> None:
        with self._lock:
            self._step, self._last = step, self._clock()

    def progress(self) -> None:
        with self._lock:
            self._last = self._clock()

    def end(self) -> None:
        with self._lock:
            self._step, self._last = None, self._clock()

    def stalled_for(self) -> tuple[str | None, float]:
        """(current step or None when idle, seconds since it last made progress; 0 when idle)."""
        with self._lock:
            if self._step is None:
                return None, 0.0
            return self._step, self._clock() - self._last


class Watchdog:
    """A daemon thread sending WATCHDOG=1 every half interval while :class:`Health` says the worker is fine."""

    def __init__(self, notifier: Notifier, health: Health, interval: float):
        self.notifier = notifier
        self.health = health
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batchd-watchdog", daemon=True)
        self.pings = 0

    def start(self) -> None:
        log.info("watchdog.started", interval_s=self.interval, ping_every_s=self.interval / 2)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        silent = False
        while True:
            step, stalled = self.health.stalled_for()
            if stalled < self.interval:
                self.notifier.watchdog()
                self.pings += 1
                if silent:
                    log.info("watchdog.resumed", step=step)
                    silent = False
            elif not silent:
                # No ping any more: systemd will kill us with SIGABRT after WatchdogSec and restart us.
                log.error("watchdog.stalled", step=step, stalled_s=round(stalled, 1), interval_s=self.interval)
                silent = True
            if self._stop.wait(self.interval / 2):
                return


__all__ = ["Health", "Notifier", "Watchdog", "watchdog_interval"]
