"""Logging setup: structlog, configured once at the entry point (never by library modules).

- On a terminal: readable, colored lines.
- Otherwise: one JSON object per line on stdout — ``timestamp`` (ISO-8601 UTC), ``level``, ``event``
  (a constant dotted name), ``logger``, then the event's fields. Exceptions become a structured
  ``exception`` field (type, message, frames — never local variables, which could hold chunk texts or
  credentials).
- When stdout is the journal (``$JOURNAL_STREAM`` names stdout's device:inode, as systemd sets it), each
  line starts with the sd-daemon priority ``<3>``..``<7>``: journald strips it and stores PRIORITY=, so
  ``journalctl -p warning`` filters and ``journalctl -o cat`` prints clean JSON.

stdlib ``logging`` records (APScheduler, google-auth, urllib3), ``warnings.warn`` and uncaught exceptions
(main thread and other threads) all pass through the same pipeline, so every line the process writes is
such an event. What C libraries write to fd 1/2 is captured by :mod:`batchd.capture` (``batchd run`` only).

APScheduler's "skipped: maximum number of running instances reached" is expected (a sync that outlasts
``sync_interval``; the next tick runs it): it is lowered to debug.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# sd-daemon(3) priorities: <3> err ... <7> debug.
_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "warn": 4, "notice": 5, "info": 6,
             "debug": 7}

# Chatty dependencies: their INFO lines (APScheduler's "Running job ...") add nothing at info level.
_QUIET_BELOW_DEBUG = ("apscheduler", "urllib3", "google", "googleapiclient", "filelock", "sentence_transformers",
                      "transformers", "huggingface_hub", "httpx")

_handler: logging.Handler | None = None
_output_fd = 1  # where log lines go (a signal handler writes there without the logging locks)


def configure(level: str = "info", *, stream: TextIO | None = None, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging for this process. Safe to call again (replaces the setup).

    ``level`` is one of debug/info/warning/error (``[daemon] log_level``). ``stream`` defaults to stdout;
    ``json`` forces the renderer (default: JSON unless the stream is a terminal outside the journal).
    """
    global _handler, _output_fd
    out = stream if stream is not None else sys.stdout
    try:
        _output_fd = out.fileno()
    except (AttributeError, ValueError, OSError):
        _output_fd = 1
    journal = stream_is_journal(out)
    use_json = json if json is not None else (journal or not _isatty(out))

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
        _normalise_level,
    ]
    if use_json:
        renderer: Any = _JSONLine(journal)
        exc: list[Any] = [structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
        exc = []

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _foreign_event],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exc, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_expected_skip)

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    for h in list(root.handlers):  # a stray basicConfig() would print a second, unstructured copy
        root.removeHandler(h)
    root.addHandler(handler)
    _handler = handler
    set_level(level)

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )

    logging.captureWarnings(True)  # warnings.warn() -> logger "py.warnings" -> this pipeline
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def set_level(level: str) -> None:
    """Change the level of a configured pipeline (``systemctl reload`` applies ``[daemon] log_level`` live)."""
    lvl = LEVELS.get(level.lower(), logging.INFO)
    logging.getLogger().setLevel(lvl)
    for name in _QUIET_BELOW_DEBUG:
        logging.getLogger(name).setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))


def output_fd() -> int:
    """The file descriptor log lines are written to (for a line written from a signal handler)."""
    return _output_fd


def _expected_skip(record: logging.LogRecord) -> bool:
    """Lower APScheduler's "maximum number of running instances reached" warning to debug: with
    ``max_instances=1`` it only says a step outlasted its interval, and the next tick runs it."""
    if record.name.startswith("apscheduler") and "maximum number of running instances" in str(record.msg):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


def stream_is_journal(stream: TextIO) -> bool:
    """True when ``$JOURNAL_STREAM`` ("dev:inode") names this stream's file, as systemd sets it.

    A child whose stdout was redirected elsewhere inherits the variable; comparing the inode keeps a
    ``<6>`` prefix out of its files.
    """
    try:
        return fd_is_journal(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False


def fd_is_journal(fd: int) -> bool:
    """:func:`stream_is_journal` for a file descriptor."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":", 1))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _JSONLine:
    """Render the event dict as one compact JSON line, with a ``<N>`` priority prefix for the journal."""

    def __init__(self, journal: bool):
        self.journal = journal

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        ordered = {k: event.pop(k) for k in ("timestamp", "level", "event", "logger") if k in event}
        ordered.update(event)
        line = orjson.dumps(ordered, default=_fallback).decode()
        if self.journal:
            return f"<{_PRIORITY.get(str(ordered.get('level')), 6)}>{line}"
        return line


def _fallback(value: Any) -> Any:
    return str(value)


def _normalise_level(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    level = str(event.get("level", "info")).lower()
    event["level"] = {"warn": "warning", "exception": "error"}.get(level, level)
    return event


def _foreign_event(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A stdlib record from a dependency: its free text goes to ``message``; ``event`` stays a dotted name."""
    record = event.get("_record")
    if record is not None and isinstance(event.get("event"), str):
        name = "warning.python" if record.name == "py.warnings" else "library.log"
        event["message"] = event["event"].strip()
        event["event"] = name
    return event


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger("batchd").critical("process.crashed", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger("batchd").critical(
        "thread.crashed", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

MALFORMED_LOGGED = 20  # malformed output lines of one job read that get a log line each


class MalformedLines:
    """``job.output_malformed`` for the first MALFORMED_LOGGED lines of one job's output that name no row, then
    one ``job.output_malformed_more``: an output the parser cannot read at all (a changed format, garbage) must
    not write a warning per line, 30,000 per batch at every sync. Every such line is still counted on the batch
    (``unmatched_lines``, and ``job.output_unmatched`` once per batch)."""

    def __init__(self, logger: Any, job: str):
        self.logger, self.job, self.count = logger, job, 0

    def __call__(self, file: str, line: int) -> None:
        self.count += 1
        if self.count <= MALFORMED_LOGGED:
            self.logger.warning("job.output_malformed", google_job_id=self.job, file=file, line=line)
        elif self.count == MALFORMED_LOGGED + 1:
            self.logger.warning("job.output_malformed_more", google_job_id=self.job, logged=MALFORMED_LOGGED,
                                file=file, line=line, more="further lines that name no row are counted, not logged")


__all__ = ["LEVELS", "MALFORMED_LOGGED", "MalformedLines", "configure", "fd_is_journal", "output_fd", "set_level",
           "stream_is_journal"]
