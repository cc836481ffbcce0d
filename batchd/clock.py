"""Ages of wall-clock stamps that survive wall-clock jumps within a process.

batchd stamps rows with wall-clock time (``batch_jobs.created_at``, ``chunks.queued_at``): it is the only time
that means something to another process or after a restart. But deciding by ``now - stamp`` alone turns a clock
step into a decision: a forward jump of a day timed out (cancelled, and paid again) every running job; a backward
jump made ``max_wait`` wait a day longer.

:class:`Ages` measures from the first time this process sees a stamp: the age then is taken from the wall clock
(clamped at zero: a stamp "in the future" is new), and from then on it grows with the monotonic clock only. So a
jump while batchd runs changes nothing; across a restart the wall clock is all there is.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable


class Ages:
    """``age(key, stamp)``: seconds since ``stamp`` (epoch seconds), immune to wall-clock jumps after first sight."""

    def __init__(self, wall: Callable[[], float], monotonic: Callable[[], float]):
        self._wall = wall
        self._mono = monotonic
        self._seen: dict[Hashable, tuple[float, float, float]] = {}  # key -> (stamp, mono at sight, age at sight)

    def age(self, key: Hashable, stamp: float) -> float:
        """How old ``stamp`` is. A new ``stamp`` for a known ``key`` starts over (the oldest pending chunk moved)."""
        seen = self._seen.get(key)
        if seen is None or seen[0] != stamp:
            seen = (stamp, self._mono(), max(0.0, self._wall() - stamp))
            self._seen[key] = seen
        _, mono_then, age_then = seen
        return age_then + max(0.0, self._mono() - mono_then)

    def keep_only(self, keys: Iterable[Hashable], prefix: str) -> None:
        """Forget the keys ``(prefix, ...)`` not in ``keys`` (finished batches), so the table stays small."""
        wanted = set(keys)
        for key in [k for k in self._seen if isinstance(k, tuple) and k and k[0] == prefix and k not in wanted]:
            del self._seen[key]


# A step of the wall clock against the monotonic clock larger than this is a jump (NTP slews far less).
JUMP_S = 2.0


class JumpWatch:
    """A daemon thread noticing wall-clock jumps: when ``time.time() - time.monotonic()`` moves by more than
    :data:`JUMP_S`, ``on_jump(seconds)`` is called (negative: the clock went back).

    APScheduler waits for wall-clock run times: after a backward jump of a day the daemon slept a day. The
    daemon's ``on_jump`` makes every scheduled step due at once, so the schedule restarts from the new time.
    """

    def __init__(self, on_jump: Callable[[float], None], every: float = 1.0,
                 wall: Callable[[], float] | None = None, monotonic: Callable[[], float] | None = None):
        import threading
        import time

        self._on_jump = on_jump
        self._every = every
        self._wall = wall or time.time
        self._mono = monotonic or time.monotonic
        self._stop = threading.Event()
        self._offset = self._wall() - self._mono()
        self._thread = threading.Thread(target=self._loop, name="batchd-clock", daemon=True)

    def start(self) -> JumpWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> float | None:
        """One look at the clocks: the jump (seconds) if there was one since the last look, else None."""
        offset = self._wall() - self._mono()
        jump = offset - self._offset
        if abs(jump) <= JUMP_S:
            return None
        self._offset = offset
        return jump

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            jump = self.check()
            if jump is not None:
                self._on_jump(jump)


__all__ = ["JUMP_S", "Ages", "JumpWatch"]
