"""Deterministic crash points for the fault suite (test-only; a no-op unless the variable below is set).

``BATCHD_CRASH_AT=<point>[:<n>]`` makes the process kill itself with SIGKILL the n-th time (default: the first)
it reaches ``crash_point(<point>)`` — nothing else runs, as with a power cut or the OOM killer. The points are the
instants where a crash is most dangerous (tests/faults/test_crash_points.py proves batchd survives each):

  claim.committed        a batch row and its claimed chunks are committed; nothing was sent yet
  submit.uploaded        the batch's input is staged (uploaded); no job was created yet
  submit.created         the remote job exists; its name is not saved yet
  results.slice_applied  one slice of results is committed; the rest are not
  recover.found          recovery asked the backend for the job of an interrupted batch; nothing recorded yet
"""

from __future__ import annotations

import os
import signal

ENV = "BATCHD_CRASH_AT"
POINTS = ("claim.committed", "submit.uploaded", "submit.created", "results.slice_applied", "recover.found")
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``$BATCHD_CRASH_AT`` names this point (and this is its n-th visit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "POINTS", "crash_point"]
