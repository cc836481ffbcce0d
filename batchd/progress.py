"""Progress of a long read of results: the :class:`Activity` the manager reports, and a terminal's bar for it.

The manager reports an :class:`Activity` while a batch's results are read (for the local backend: while it
embeds). The daemon puts its :meth:`Activity.text` in STATUS=; ``batchd run --until-idle`` on a terminal draws
it with tqdm (:class:`TerminalProgress`: rate and ETA included), one bar per batch, and one line of queue counts
per cycle. Logs stay readable lines then.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import structlog

log = structlog.get_logger("batchd.manager")  # the manager's events, emitted on its behalf
T = TypeVar("T")


@dataclass
class Activity:
    """What a long read of results is doing right now (for STATUS=, a progress bar and batch.progress events).

    ``done`` counts result lines produced so far (replayed or computed), ``total`` the distinct texts of the
    batch (one line each). ``verb`` is "embedding" when the backend computes the vectors while they are read
    (the local backend), else "reading" (downloading and parsing a finished job's output).
    """

    batch_id: int
    total: int
    verb: str = "applying"
    done: int = 0
    slices: int = 0

    base: tuple[float, int] | None = None  # (time, done) at the first progress report: the rate leaves out
    # what came before it (loading a model, opening a download), which would make a short batch look stalled

    def rate(self, now: float | None = None) -> float:
        """Lines per second since the backend first reported progress (0 until it has twice)."""
        if self.base is None:
            return 0.0
        elapsed = (time.monotonic() if now is None else now) - self.base[0]
        return (self.done - self.base[1]) / elapsed if elapsed > 0 else 0.0

    def text(self) -> str:
        """e.g. ``embedding batch 3: 1,200/3,000 (45/s)``."""
        total = max(self.total, self.done)  # lines replayed after a restart may exceed what is still in flight
        return f"{self.verb} batch {self.batch_id}: {self.done:,}/{total:,} ({self.rate():,.0f}/s)"



def computes_results(backend: Any) -> bool:
    """True for a backend whose ``results()`` does the embedding (the local backend: no remote service works
    between two polls), so SUCCEEDED from ``status()`` means "ready to compute", not "done"."""
    return bool(getattr(backend, "computes_results", False))


class ReadProgress:
    """Follows one batch's read of results for the manager: counts the lines as the backend produces them
    (:meth:`tick`, its ``progress`` callback) and as they are consumed (:meth:`count`), reports the
    :class:`Activity` to ``on_activity`` and a ``batch.progress`` info event every EVENT_EVERY backend slices,
    at most one per EVENT_MIN_SECONDS."""

    EVENT_EVERY = 5
    EVENT_MIN_SECONDS = 5.0  # and never more often: a raw download ticks per 256 KiB block (hundreds per job)

    def __init__(self, act: Activity, on_activity: Callable[[Activity], None] | None, progress: Callable[[], None]):
        self.act = act
        self.on_activity = on_activity
        self.progress = progress
        self._last_event: float | None = None
        self.report()

    def tick(self, produced: int | None = None) -> None:
        """The backend's progress call (per slice embedded, per block downloaded); ``produced`` (optional) is
        the number of lines it has made so far, ahead of those consumed. Feeds the watchdog; may raise Stopped."""
        act = self.act
        if produced is not None:
            act.done = max(act.done, produced)
        if act.base is None:
            act.base = (time.monotonic(), act.done)
        act.slices += 1
        now = time.monotonic()
        event = act.slices % self.EVENT_EVERY == 0 and (
            self._last_event is None or now - self._last_event >= self.EVENT_MIN_SECONDS)
        if event:
            self._last_event = now
        self.report(event=event)
        self.progress()

    def count(self, lines: Iterable[T]) -> Iterator[T]:
        for seen, line in enumerate(lines, start=1):
            self.act.done = max(self.act.done, seen)
            yield line

    def report(self, *, event: bool = False) -> None:
        act = self.act
        if event:
            rate = act.rate()
            log.info("batch.progress", batch_id=act.batch_id, done=act.done, total=act.total,
                     per_s=round(rate, 1), eta_s=round((act.total - act.done) / rate) if rate > 0 else None)
        if self.on_activity is not None:
            self.on_activity(act)


class TerminalProgress:
    """tqdm bars on ``stream``, one per batch being read."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._bar: Any = None
        self._batch: int | None = None

    @classmethod
    def for_stream(cls, stream: TextIO) -> TerminalProgress | None:
        """A progress display when ``stream`` is a terminal, else None."""
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(stream) if tty else None

    def update(self, act: Activity) -> None:
        from tqdm import tqdm

        if self._batch != act.batch_id:
            self._close_bar()
            self._batch = act.batch_id
            # The terminal's width when the bar starts (a terminal that reports no size gets 100 columns).
            width = shutil.get_terminal_size((100, 24)).columns or 100
            self._bar = tqdm(total=act.total, desc=f"{act.verb} batch {act.batch_id}", unit="text",
                             file=self.stream, ncols=width, leave=True, mininterval=0.5)
        bar = self._bar
        if act.done > bar.total:
            bar.total = act.done
        bar.update(act.done - bar.n)

    def cycle(self, stats: dict[str, Any]) -> None:
        self._close_bar()
        self.stream.write(f"pending={stats['pending']:,} running={stats['running']:,} ready={stats['ready']:,} "
                          f"failed={stats['failed']:,}\n")
        self.stream.flush()

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._batch = None, None


__all__ = ["Activity", "ReadProgress", "TerminalProgress", "computes_results"]
