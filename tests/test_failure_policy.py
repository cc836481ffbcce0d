"""The manager's one failure policy: close a batch (status + reason) or defer it (reason, traceback when it is
a bug); exceptions as one line; Stopped unswallowable; the flush summary; drain()."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from batchd.backends import BackendError, JobInfo, PermanentError, ResultLine, Stopped
from batchd.errors import BatchdError, is_expected, message, one_line
from batchd.manager import BatchManager
from tests.fakes.membackend import ScriptedBackend


def manager_on(w: Any, backend_cls: type, **kw: Any) -> BatchManager:
    """A second manager on the same database and backend folder, with another (test double) backend."""
    return BatchManager(w.store, backend_cls(w.config, w.store.instance_id), w.config, clock=w.clock, **kw)

# ------------------------------------------------------------------------------------ one line per exception


class _Resp:
    def __init__(self, status: int, body: Any, text: str = ""):
        self.status_code, self._body, self.text = status, body, text

    def json(self) -> Any:
        if self._body is None:
            raise ValueError("not JSON")
        return self._body


class _MediaError(Exception):
    """Shaped like google-resumable-media's InvalidResponse: a response, no .message."""

    def __init__(self, resp: _Resp):
        super().__init__("Request failed")
        self.response = resp


class _ApiError(Exception):
    """Shaped like google-api-core's GoogleAPICallError: .code and .message."""

    def __init__(self, code: int, msg: str):
        super().__init__(f"{code} {msg}")
        self.code, self.message = code, msg


def test_one_line_names_the_type_of_what_is_not_batchds_own_error():
    assert one_line(KeyError("x")) == "KeyError: 'x'"
    assert one_line(TypeError()) == "TypeError"
    assert one_line(BackendError("503 service\n   unavailable")) == "503 service unavailable"
    assert one_line(PermanentError("")) == "PermanentError"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x")) == \
        "[Errno 2] No such file or directory: '/x'"
    assert isinstance(BackendError("x"), BatchdError)


def test_one_line_keeps_http_status_and_the_servers_message():
    assert message(_ApiError(403, "Permission\n denied on bucket")) == "403 Permission denied on bucket"
    assert message(_ApiError(404, "404 already there")) == "404 already there"
    err = _MediaError(_Resp(404, {"error": {"message": "The specified bucket does not exist."}}))
    assert message(err) == "404 The specified bucket does not exist."
    assert message(_MediaError(_Resp(502, None, "<html>bad gateway</html>"))) == "502 <html>bad gateway</html>"
    assert len(message(BackendError("x" * 10_000))) == 500


def test_is_expected_tells_operational_failures_from_bugs():
    assert is_expected(BackendError("429")) and is_expected(ConnectionResetError()) and is_expected(TimeoutError())
    assert not is_expected(TypeError("unsupported operand")) and not is_expected(KeyError("key"))
    from google.api_core import exceptions as gexc

    assert is_expected(gexc.ServiceUnavailable("down")) and is_expected(gexc.RetryError("deadline", None))


def test_one_duration_format_for_settings_and_ages():
    from batchd.config import format_duration, parse_duration

    assert [format_duration(s) for s in (7200, 5400, 86400, 45, 61.5)] == ["2h", "90m", "1d", "45s", "61.5s"]
    assert [format_duration(s, exact=False) for s in (5400, 42.7, 90000, 0)] == ["1h", "42s", "1d", "0s"]
    for text in ("2h", "90m", "45s", "3d"):
        assert format_duration(parse_duration(text)) == text


# ------------------------------------------------------------------------------------ Stopped


def test_stopped_cannot_be_swallowed_by_a_catch_all():
    assert issubclass(Stopped, BaseException) and not issubclass(Stopped, Exception)
    with pytest.raises(Stopped):
        try:
            raise Stopped()
        except Exception:  # noqa: BLE001 - what a backend's "retry anything" loop looks like
            pytest.fail("a catch-all swallowed a shutdown")


class RetriesAnything(ScriptedBackend):
    """A backend that retries any exception while streaming results, as a naive one would."""

    def results(self, job_name: str, progress: Any = lambda: None) -> Iterator[ResultLine]:
        for line in super().results(job_name):
            try:
                progress()
            except Exception:  # noqa: BLE001 - the naive retry this test is about
                continue
            yield line


def test_shutdown_stops_a_sync_even_through_a_backends_catch_all(world):
    w = world()
    w.manager.enqueue([(None, f"t{i}") for i in range(20)])
    w.manager.flush_queue(force=True)
    calls = 0

    def progress() -> None:
        nonlocal calls
        calls += 1
        if calls >= 5:
            raise Stopped()

    s = manager_on(w, RetriesAnything, progress=progress).sync_status()
    assert s.stopped and s.applied == 0 and s.finished == 0
    assert w.store.batch(1).status == "RUNNING"  # resumed by the next sync, not closed
    assert manager_on(w, RetriesAnything).sync_status().applied == 20


# ------------------------------------------------------------------------------------ defer: traceback for bugs


class BuggyStatus(ScriptedBackend):
    """status() has a bug: a TypeError."""

    def status(self, job_name: str) -> JobInfo:
        return None + 1  # type: ignore[operator, return-value]


class FlakyStatus(ScriptedBackend):
    def status(self, job_name: str) -> JobInfo:
        raise BackendError("503 simulated")


@pytest.mark.parametrize("mode", ["bug", "transient"])
def test_a_deferred_batch_logs_its_traceback_only_when_it_is_a_bug(world, mode):
    w = world()
    w.manager.enqueue([(None, "x")])
    w.manager.flush_queue(force=True)
    with capture_logs() as logs:
        s = manager_on(w, BuggyStatus if mode == "bug" else FlakyStatus).sync_status()
    [event] = [e for e in logs if e["event"] == "job.status_failed"]
    b = w.store.batch(1)
    assert b.status == "RUNNING"
    if mode == "bug":
        assert event.get("exc_info") is True
        assert event["error"].startswith("TypeError: unsupported operand")
        assert b.error_message.startswith("status check failed, will retry: TypeError: unsupported operand")
        assert s.errors == [f"batch 1: {event['error']}"]
    else:
        assert not event.get("exc_info")
        assert b.error_message == "status check failed, will retry: 503 simulated"


# ------------------------------------------------------------------------------------ the flush summary


def test_flush_summary_says_what_was_submitted_rejected_and_deferred(world):
    w = world(queue={"max_batch_size": 5})
    w.manager.enqueue([(None, f"t{i}") for i in range(10)])
    w.knobs(submit_permanent="400 model not allowed")
    s = w.manager.flush_queue(force=True)
    assert s.created == [1] and s.submitted == [] and s.errored == 5  # a rejection stops this flush
    [n] = s.not_submitted
    assert (n.batch_id, n.status, n.reason) == (1, "FAILED", "submit rejected: 400 model not allowed")
    assert s.errors == ["batch 1: submit rejected: 400 model not allowed"] and s.deferred == []

    w.knobs(submit_errors=1)
    s = w.manager.flush_queue(force=True)
    assert s.created == [2] and s.deferred == [2]
    assert s.not_submitted[0].reason == "submit failed, will retry: 503 simulated: service unavailable"
    assert w.store.batch(2).error_message == s.not_submitted[0].reason

    s = w.manager.flush_queue(force=True)  # recover() submits batch 2, then batch 3 is claimed for the rest
    assert s.created == [3] and s.submitted == [2, 3] and s.not_submitted == []
    assert s.as_dict() == {"created": [3], "submitted": [2, 3], "not_submitted": [], "errored": 0, "failed": 0,
                           "stopped": False}


class StopsDuringSubmit(ScriptedBackend):
    def submit(self, batch_id: int, items: Any, progress: Any = lambda: None) -> str:
        raise Stopped()


def test_shutdown_during_submit_ends_the_flush_with_stopped_and_the_batch_for_recover(world):
    w = world()
    w.manager.enqueue([(None, "x")])
    s = manager_on(w, StopsDuringSubmit).flush_queue(force=True)
    assert s.stopped and s.created == [1] and s.submitted == []
    b = w.store.batch(1)
    assert b.status == "PENDING" and b.google_job_id is None


# ------------------------------------------------------------------------------------ drain


def test_drain_runs_rounds_until_idle(world):
    w = world(queue={"max_batch_size": 4})
    w.knobs(polls_to_finish=1)
    w.manager.enqueue([(None, f"t{i}") for i in range(10)])
    seen: list[dict[str, Any]] = []
    done = w.manager.drain(on_round=seen.append)
    assert done.idle and done.why == "idle" and done.stats["ready"] == 10
    assert done.rounds == len(seen) >= 2


def test_drain_ends_when_a_round_changes_nothing_or_a_step_gives_up(world):
    w = world()
    w.knobs(never_finish=True)
    w.manager.enqueue([(None, "x")])
    done = w.manager.drain(stall_rounds=2)
    assert done.why == "stalled" and done.rounds == 3 and done.stats["running"] == 1

    done = w.manager.drain(give_up=lambda: "sync: failing")
    assert (done.why, done.detail, done.rounds) == ("gave_up", "sync: failing", 1)

    pauses = iter([True, False])
    done = w.manager.drain(pause=lambda: next(pauses))
    assert (done.why, done.rounds) == ("stopped", 2)


# ------------------------------------------------------------------------------------ the service's own counts


def test_a_job_whose_output_is_shorter_than_the_service_says_is_reported(world):
    w = world()
    w.manager.enqueue([(None, f"t{i}") for i in range(10)])
    w.manager.flush_queue(force=True)
    w.knobs(drop_every=5, fail_every=3)
    with capture_logs() as logs:
        s = w.manager.sync_status()
    assert s.applied == 5 and s.errored == 5  # items 5, 10 dropped; 3, 6, 9 failed
    [short] = [e for e in logs if e["event"] == "job.output_short"]
    assert (short["lines"], short["service_succeeded"], short["service_failed"]) == (8, 7, 3)
    [synced] = [e for e in logs if e["event"] == "batch.synced"]
    assert (synced["lines"], synced["service_succeeded"], synced["service_failed"]) == (8, 7, 3)

    w.knobs()
    w.manager.enqueue([(None, f"u{i}") for i in range(10)])
    w.manager.flush_queue(force=True)
    with capture_logs() as logs:
        w.manager.sync_status()
    assert not [e for e in logs if e["event"] == "job.output_short"]
