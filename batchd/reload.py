"""``systemctl reload batch-worker`` (SIGHUP): re-read the TOML and apply what can change while running.

Live keys — everything in ``[queue]`` (intervals, thresholds, ``max_running_jobs``, ...) and
``[daemon] log_level`` — take effect at once: the manager gets the new config for its next step, the flush and
sync timers are rescheduled, the log level changes. No step is interrupted: the one running finishes with the
settings it started with. Every other key (database, embedding backend, model, dimensions, ``[vertex]``,
``[local]``) is kept as it was and named in a ``config.needs_restart`` warning. A file that does not parse or
validate changes nothing: the running configuration stays, and ``config.reload_failed`` (priority err) says why.

systemd is told ``RELOADING=1`` first and ``READY=1`` when done, so ``systemctl status`` shows the reload.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import structlog

from batchd import logs
from batchd.config import Config, ConfigError, Duration, load
from batchd.errors import one_line

log = structlog.get_logger("batchd.reload")

LIVE_SECTIONS = ("queue",)
LIVE_KEYS = ("daemon.log_level",)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted names of every key whose value differs between two configs."""
    out = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        a, b = getattr(old, section.name), getattr(new, section.name)
        if not dataclasses.is_dataclass(a):  # [plugin.<name>] tables: a mapping per plugin
            out += [f"{section.name}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            continue
        for f in dataclasses.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                out.append(f"{section.name}.{f.name}")
    return out


def is_live(key: str) -> bool:
    return key.split(".", 1)[0] in LIVE_SECTIONS or key in LIVE_KEYS


def merge_live(old: Config, new: Config) -> Config:
    """``old`` with the live keys of ``new``."""
    return dataclasses.replace(
        old, queue=new.queue, daemon=dataclasses.replace(old.daemon, log_level=new.daemon.log_level))


def reload(worker: Any, path: str, scheduler: Any = None) -> bool:
    """Apply ``path`` to a running worker (and its scheduler's timers). True when the new file was valid."""
    worker.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        try:
            new = load(path)
        except ConfigError as e:
            log.error("config.reload_failed", error=str(e), kept="the running configuration")
            return False
        old = worker.manager.config
        changed = changed_keys(old, new)
        live = [k for k in changed if is_live(k)]
        restart = [k for k in changed if not is_live(k)]
        merged = merge_live(old, new)
        worker.manager.config = merged  # one attribute swap: a step reads its config once, when it starts
        q = merged.queue
        worker.steps["recover"].interval = worker.steps["flush"].interval = float(q.flush_interval)
        worker.steps["sync"].interval = float(q.sync_interval)
        if "daemon.log_level" in live:
            logs.set_level(merged.daemon.log_level)
        if scheduler is not None:
            for job_id, key, seconds in (("flush", "queue.flush_interval", q.flush_interval),
                                         ("sync", "queue.sync_interval", q.sync_interval)):
                if key in live:
                    scheduler.reschedule_job(job_id, trigger="interval", seconds=float(seconds))
        log.info("config.reloaded", path=path, applied=live,
                 values={k: _value(merged, k) for k in live}, unchanged=not changed)
        if restart:
            log.warning("config.needs_restart", keys=restart,
                        hint="these keys keep their running values until `systemctl restart batch-worker`")
        return True
    finally:
        # Counts from the worker's last report: the reload thread never touches the worker's connection.
        last = worker.last_stats
        worker.notifier.ready(worker.status_line(last) if last is not None else None)


def watch(worker: Any, scheduler: Any, path: str, done: threading.Event) -> threading.Thread:
    """Start the thread that applies a reload each time SIGHUP sets ``worker.reload`` (the signal handler only
    sets the flag), until ``done`` or the worker's stop."""

    def loop() -> None:
        while not done.is_set() and not worker.stop.is_set():
            if worker.reload.wait(0.5):
                worker.reload.clear()
                try:
                    reload(worker, path, scheduler)
                except Exception as e:  # a failed reload must never stop the daemon
                    log.error("config.reload_failed", error=one_line(e), exc_info=True)

    t = threading.Thread(target=loop, name="batchd-reloader", daemon=True)
    t.start()
    return t


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    value = getattr(getattr(cfg, section), name)
    return float(value) if isinstance(value, Duration) else value  # seconds, as a JSON number


__all__ = ["changed_keys", "is_live", "merge_live", "reload", "watch"]
