"""The daemon's start: opening the database, waiting out a full disk or a busy database instead of exiting.

A daemon that exits on a full disk is restarted by systemd a few times and then given up on, and nothing embeds
until someone notices. :func:`wait_for_database` keeps ``batchd run`` up instead, says why, and carries on by
itself once space is freed (or the application's long transaction ends).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from batchd.daemon import Signals
from batchd.store import Busy, DiskFull
from batchd.systemd import Notifier, watchdog_interval

log = structlog.get_logger("batchd.daemon")


def wait_for_database(open_store: Callable[[], Any], notifier: Notifier, stop: threading.Event, *,
                      reload: threading.Event | None = None, first: float = 1.0, cap: float = 60.0) -> Any | None:
    """``batchd run``'s start: open the database, waiting out a full disk or a busy database with backoff.

    Says why in STATUS= (and READY=1 at the first wait, so systemd's start timeout does not kill it), keeps the
    watchdog fed (waiting is what it should be doing), backs off up to ``cap`` seconds. Returns the store, or
    None when SIGTERM/SIGINT came first. Other StoreErrors (a damaged file, a wrong config) are raised.

    After READY=1, ``systemctl reload`` is allowed: a SIGHUP meanwhile sets ``reload`` (applied once the daemon
    runs) instead of ending the process, which is SIGHUP's default.
    """
    signals = Signals(stop, reload).install()
    try:
        delay, attempt = first, 0
        ping = watchdog_interval()
        while not stop.is_set():
            try:
                store = open_store()
            except (DiskFull, Busy) as e:
                attempt += 1
                log.warning("daemon.database_unavailable", error=str(e), attempt=attempt, retry_in_s=delay)
                if attempt == 1:
                    notifier.ready(f"waiting for the database: {e}"[:200])
                notifier.status(f"waiting for the database ({attempt}x, retry in {delay:g}s): {e}"[:200])
                until = time.monotonic() + delay
                while not stop.is_set() and time.monotonic() < until:
                    notifier.watchdog()
                    stop.wait(min(until - time.monotonic(), (ping or 10.0) / 2))
                delay = min(delay * 2, cap)
                continue
            if attempt:
                log.info("daemon.database_available", after_attempts=attempt)
            return store
        return None
    finally:
        signals.restore()


__all__ = ["wait_for_database"]
