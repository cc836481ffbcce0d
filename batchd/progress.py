"""A terminal's progress bar for ``batchd run --until-idle``, drawn by tqdm (rate and ETA included).

The worker reports an :class:`~batchd.manager.Activity` while a batch's results are read (for the local backend:
while it embeds); each batch gets its own bar, closed when the batch is done. Between batches one line of
queue counts is printed per cycle. Only used when stderr is a terminal; logs then stay readable lines.
"""

from __future__ import annotations

import shutil
from typing import Any, TextIO

from batchd.manager import Activity


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


__all__ = ["TerminalProgress"]
