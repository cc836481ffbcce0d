"""`batchd run` as a real subprocess: a real $NOTIFY_SOCKET bound here, real signals, real log lines.

The daemon uses the file-backed test backend (tests/fakes/membackend.py) through the real plugin hook; its
knobs make calls fail, block (a wedged worker) or go slowly (a long sync) while the daemon runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.configs import daemon_config
from tests.conftest import batchd_cmd
from tests.fakes.membackend import read_counters, set_knobs

PRIORITY = re.compile(r"^<([0-7])>")
STATUS_COUNTS = re.compile(r"pending=\d+ running=\d+ ready=\d+ failed=\d+")


# ----------------------------------------------------------------------------------------- harness


class NotifySocket:
    """A Unix datagram socket standing in for systemd's notify socket; records (monotonic time, message)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("latin-1")))

    def assignments(self, key: str) -> list[tuple[float, str]]:
        out = []
        for t, msg in list(self.messages):
            for line in msg.split("\n"):
                if line.startswith(key + "="):
                    out.append((t, line[len(key) + 1:]))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class Daemon:
    """`batchd --config CFG run ...` with stdout on a pipe whose inode is in $JOURNAL_STREAM (like journald)."""

    def __init__(self, config: Path, env: dict[str, str], *args: str, notify: NotifySocket | None = None,
                 watchdog_usec: int | None = None, journal: bool = True):
        env = dict(env)
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify.path)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        rfd, wfd = os.pipe()
        if journal:
            st = os.fstat(wfd)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        self.proc = subprocess.Popen([*batchd_cmd(), "--config", str(config), "run", *args], env=env,
                                     stdout=wfd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        os.close(wfd)
        self.lines: list[str] = []
        self.stderr = b""
        self._out = os.fdopen(rfd, "r", encoding="utf-8", errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._out:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(PRIORITY.sub("", line, count=1)) for line in list(self.lines)]

    def wait_event(self, name: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e["event"] == name and all(e.get(k) == v for k, v in fields.items()):
                    return e
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader drain the pipe, then look one last time
                for e in self.events():
                    if e["event"] == name and all(e.get(k) == v for k, v in fields.items()):
                        return e
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {name}: {self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"no {name} {fields} within {timeout}s: {self.tail()}")

    def finish(self, timeout: float = 30) -> int:
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
            raise AssertionError(f"daemon did not exit within {timeout}s: {self.tail()}") from None
        self._reader.join(timeout=5)
        return self.proc.returncode

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.lines[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.finish()


def wait_until(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def enqueue(config: Path, env: dict[str, str], texts: list[str]) -> None:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    r = subprocess.run([*batchd_cmd(), "--config", str(config), "enqueue"], input=data.encode(), env=env,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()


def counts(db: Path) -> dict[str, int]:
    """Chunk statuses read straight from the file, as the application would (stdlib sqlite3, no extension)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT embedding_status, batch_job_id IS NOT NULL, count(*) FROM chunks "
                            "GROUP BY 1, 2").fetchall()
    finally:
        conn.close()
    out = {"pending": 0, "running": 0, "ready": 0, "failed": 0}
    for status, in_batch, n in rows:
        key = status.lower()
        if key == "pending" and in_batch:
            key = "running"
        out[key] += n
    return out


@pytest.fixture
def notify(tmp_path: Path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*args: Any, **kw: Any) -> Daemon:
        d = Daemon(*args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} secret chunk text number {i} zq{i}x" for i in range(n)]


# ----------------------------------------------------------------------------------------- tests


def test_notify_ready_status_watchdog_stopping_and_queue_drains(tmp_path, batchd_env, notify, daemons):
    cfg = daemon_config(tmp_path)
    first = texts("before", 20)
    enqueue(cfg, batchd_env, first)
    # A batch claimed before a "crash" and never submitted: recovery must submit it before READY=1.
    set_knobs(tmp_path / "testbackend", submit_errors=1)
    subprocess.run([*batchd_cmd(), "--config", str(cfg), "flush", "--force"], env=batchd_env, capture_output=True,
                   timeout=60)

    d = daemons(cfg, batchd_env, notify=notify, watchdog_usec=1_000_000)
    wait_until(lambda: notify.assignments("READY"), what="READY=1")
    ready_event = d.wait_event("daemon.ready")
    events = d.events()
    names = [e["event"] for e in events]
    assert names.index("batch.submitted") < names.index("daemon.ready"), "recovery ran after READY=1"
    assert ready_event["running"] == 20 or ready_event["ready"] + ready_event["running"] == 20

    # Chunks enqueued while the daemon runs end READY without any other command.
    later = texts("after", 30)
    enqueue(cfg, batchd_env, later)
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 50, what="all 50 chunks READY")
    wait_until(lambda: any("ready=50" in s for _, s in notify.assignments("STATUS")), what="STATUS ready=50")

    statuses = [s for _, s in notify.assignments("STATUS")]
    assert any(STATUS_COUNTS.search(s) and "last sync" in s for s in statuses), statuses

    # Watchdog pings, sent by their own thread at about half of WATCHDOG_USEC while the worker is healthy.
    wait_until(lambda: len(notify.assignments("WATCHDOG")) >= 5, what="5 WATCHDOG=1 pings")
    pings = [t for t, _ in notify.assignments("WATCHDOG")]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    mean_gap = sum(gaps) / len(gaps)
    print(f"watchdog: {len(pings)} pings, mean gap {mean_gap:.3f}s for WATCHDOG_USEC=1s")
    assert 0.25 < mean_gap < 1.0

    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
    assert notify.assignments("STOPPING")
    assert d.stderr == b"", d.stderr.decode()

    # Every stdout line is a JSON event with the journal priority prefix; no chunk text ever appears.
    assert d.lines
    for line in d.lines:
        m = PRIORITY.match(line)
        assert m, line
        event = json.loads(line[m.end():])
        assert {"timestamp", "level", "event", "logger"} <= set(event)
        assert event["timestamp"].endswith("Z")
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", event["event"]), event["event"]
        assert "secret chunk text" not in line and "zq" not in line
    stopped = d.events()[-1]
    assert stopped["event"] == "daemon.stopped", d.tail(4)
    assert stopped["event"] == "daemon.stopped" and stopped["signal"] == "SIGTERM"


def test_wedged_worker_stops_the_watchdog_pings(tmp_path, batchd_env, notify, daemons):
    cfg = daemon_config(tmp_path)
    enqueue(cfg, batchd_env, texts("w", 5))
    folder = tmp_path / "testbackend"
    set_knobs(folder, block="submit")  # the first submit hangs, reporting no progress

    d = daemons(cfg, batchd_env, notify=notify, watchdog_usec=1_000_000)
    stalled = d.wait_event("watchdog.stalled")
    assert stalled["step"] == "flush" and stalled["level"] == "error"
    assert PRIORITY.match([line for line in d.lines if "watchdog.stalled" in line][0]).group(1) == "3"
    n = len(notify.assignments("WATCHDOG"))
    time.sleep(2.5)  # more than two whole watchdog intervals: systemd would have killed us by now
    assert len(notify.assignments("WATCHDOG")) == n, "pings continued while the worker was wedged"

    set_knobs(folder)  # unwedge: the submit goes through, progress resumes, so do the pings
    d.wait_event("watchdog.resumed")
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 5, what="chunks READY after unwedging")
    wait_until(lambda: len(notify.assignments("WATCHDOG")) > n, what="pings again")
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0


def test_sigterm_mid_sync_exits_0_and_the_next_run_finishes(tmp_path, batchd_env, notify, daemons):
    cfg = daemon_config(tmp_path, flush="0.5s", sync="0.5s")
    folder = tmp_path / "testbackend"
    n = 400
    enqueue(cfg, batchd_env, texts("s", n))
    set_knobs(folder, result_delay=0.02)  # 400 lines take 8s to read; progress every 50 lines

    d = daemons(cfg, batchd_env, notify=notify)
    d.wait_event("job.state", state="SUCCEEDED")  # the sync is now streaming results
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert d.finish() == 0
    print(f"exit after SIGTERM mid-sync: {time.monotonic() - t0:.2f}s")
    names = [e["event"] for e in d.events()]
    assert "sync.stopped" in names and "daemon.stopped" in names
    assert notify.assignments("STOPPING")
    mid = counts(tmp_path / "app.db")
    assert mid["ready"] < n and mid["running"] == n - mid["ready"], mid

    set_knobs(folder)
    nxt = daemons(cfg, batchd_env, "--until-idle", "--poll", "0.2s")
    assert nxt.finish(timeout=60) == 0, nxt.tail()
    assert counts(tmp_path / "app.db") == {"pending": 0, "running": 0, "ready": n, "failed": 0}


def test_sigterm_while_parse_workers_spool_exits_0_leaves_no_worker_and_nothing_half_applied(
        tmp_path, batchd_env, notify, daemons):
    """Issue 15: SIGTERM during the spool phase with parse worker processes: the daemon stops within seconds,
    its workers are gone, no vector was applied (a spool is never applied in part), the next run finishes."""
    from tests.test_parse_pool import workers_of

    cfg = daemon_config(tmp_path, daemon={"parse_workers": 2},
                        embedding={"backend": "tests.fakes.membackend:RawScriptedBackend"})
    folder = tmp_path / "testbackend"
    n = 400
    enqueue(cfg, batchd_env, texts("w", n))
    set_knobs(folder, result_delay=0.02)  # 400 lines take 8 s to download; progress every 50 lines
    d = daemons(cfg, batchd_env, notify=notify)
    d.wait_event("job.parse_workers", workers=2)
    wait_until(lambda: len(workers_of(d.proc.pid)) == 2, what="two parse workers under the daemon")
    workers = workers_of(d.proc.pid)
    d.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert d.finish() == 0
    assert time.monotonic() - t0 < 10
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a parse worker outlived the daemon"
    assert counts(tmp_path / "app.db") == {"pending": 0, "running": n, "ready": 0, "failed": 0}
    set_knobs(folder)
    nxt = daemons(cfg, batchd_env, "--until-idle", "--poll", "0.2s")
    assert nxt.finish(timeout=60) == 0, nxt.tail()
    assert counts(tmp_path / "app.db") == {"pending": 0, "running": 0, "ready": n, "failed": 0}
    assert not list(tmp_path.glob("app.db-batchd-spool-*"))


def test_second_signal_exits_at_once(tmp_path, batchd_env, daemons):
    cfg = daemon_config(tmp_path)
    enqueue(cfg, batchd_env, texts("k", 3))
    set_knobs(tmp_path / "testbackend", block="status")  # a stuck sync ignores the first SIGTERM
    d = daemons(cfg, batchd_env)
    d.wait_event("batch.submitted")
    time.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_event("daemon.stopping")
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish(timeout=10) == 128 + signal.SIGTERM
    assert d.events()[-1]["event"] == "daemon.killed"
    set_knobs(tmp_path / "testbackend")
    # The database is whole: the next run finishes the queue.
    nxt = daemons(cfg, batchd_env, "--until-idle", "--poll", "0.2s")
    assert nxt.finish(timeout=60) == 0, nxt.tail()
    assert counts(tmp_path / "app.db")["ready"] == 3


def test_failures_are_logged_retried_and_the_scheduler_survives(tmp_path, batchd_env, notify, daemons):
    cfg = daemon_config(tmp_path)
    folder = tmp_path / "testbackend"
    set_knobs(folder, submit_errors=2, status_errors=2)  # transient backend failures
    d = daemons(cfg, batchd_env, notify=notify)
    d.wait_event("daemon.ready")
    enqueue(cfg, batchd_env, texts("f", 10))
    d.wait_event("batch.submit_retry")
    d.wait_event("job.status_failed")
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 10, what="READY despite backend failures")

    # A step that raises (the application renamed its table): logged with a structured traceback, counted,
    # backed off, and the scheduler keeps running; the first success afterwards logs a recovery event.
    conn = sqlite3.connect(tmp_path / "app.db", timeout=10)
    conn.execute("ALTER TABLE chunks RENAME TO chunks_moved")
    conn.commit()
    failed = d.wait_event("daemon.step_failed")
    assert failed["level"] == "error" and failed["consecutive_failures"] >= 1
    assert isinstance(failed["exception"], list) and failed["exception"][0]["exc_type"]
    assert failed["exception"][0]["frames"]
    wait_until(lambda: any("failing" in s for _, s in notify.assignments("STATUS")), what="STATUS with the failure")
    conn.execute("ALTER TABLE chunks_moved RENAME TO chunks")
    conn.commit()
    conn.close()
    recovered = d.wait_event("daemon.step_recovered")
    assert recovered["after_failures"] >= 1
    enqueue(cfg, batchd_env, texts("g", 5))
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 15, what="chunks after recovery")
    assert read_counters(folder)["submits"] >= 4
    d.proc.send_signal(signal.SIGINT)
    assert d.finish() == 0


def test_daemon_waits_for_min_batch_size(tmp_path, batchd_env, notify, daemons):
    cfg = daemon_config(tmp_path, min_batch_size=10)
    d = daemons(cfg, batchd_env, notify=notify)
    d.wait_event("daemon.ready")
    enqueue(cfg, batchd_env, texts("m", 3))
    seen = len(notify.assignments("STATUS"))
    wait_until(lambda: len(notify.assignments("STATUS")) >= seen + 6, what="three more flush+sync cycles")
    assert counts(tmp_path / "app.db") == {"pending": 3, "running": 0, "ready": 0, "failed": 0}
    enqueue(cfg, batchd_env, texts("n", 7))  # now 10 pending: one batch of 10
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 10, what="10 READY")
    assert [e["chunks"] for e in d.events() if e["event"] == "batch.claimed"] == [10]
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0


def test_once_exits_0_then_nonzero_when_a_step_fails(tmp_path, batchd_env, daemons):
    cfg = daemon_config(tmp_path)
    folder = tmp_path / "testbackend"
    enqueue(cfg, batchd_env, texts("o", 4))
    # min_batch_size is 1 here, but --once forces a flush of whatever is pending anyway.
    ok = daemons(cfg, batchd_env, "--once", journal=False)
    assert ok.finish() == 0, ok.tail()
    assert counts(tmp_path / "app.db")["ready"] == 4
    for line in ok.lines:
        assert not line.startswith("<"), line  # $JOURNAL_STREAM unset: plain JSON
        json.loads(line)

    enqueue(cfg, batchd_env, texts("p", 2))
    set_knobs(folder, submit_errors=1)
    bad = daemons(cfg, batchd_env, "--once")
    assert bad.finish() == 1
    done = bad.wait_event("daemon.once_done")
    assert "submit" in done["failed_steps"]
    set_knobs(folder, status_errors=1)
    bad2 = daemons(cfg, batchd_env, "--once")  # submits the batch, then its status check fails
    assert bad2.finish() == 1
    assert "sync" in bad2.wait_event("daemon.once_done")["failed_steps"]
    again = daemons(cfg, batchd_env, "--once")
    assert again.finish() == 0
    assert counts(tmp_path / "app.db")["ready"] == 6


def test_bad_config_exits_78_with_one_line(tmp_path, batchd_env):
    cfg = daemon_config(tmp_path, daemon={"log_levle": "debug"})
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "run"], env=batchd_env, capture_output=True,
                       timeout=60)
    assert r.returncode == 78
    # Like every line the daemon writes, the reason is one JSON event (on a terminal: one readable line).
    assert r.stderr == b""
    (line,) = r.stdout.decode().splitlines()
    event = json.loads(line)
    assert event["event"] == "config.invalid" and event["level"] == "error"
    assert event["error"].endswith("daemon.log_levle: unknown key (expected one of: log_level, parse_workers)"), event


def test_until_idle_with_nothing_to_do_exits_0(tmp_path, batchd_env):
    cfg = daemon_config(tmp_path)
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "run", "--until-idle", "--poll", "0.1s"],
                       env=batchd_env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert [json.loads(x)["event"] for x in r.stdout.decode().splitlines()][-1] == "daemon.idle"


def test_daemon_waits_its_turn_while_another_worker_holds_the_database(tmp_path, batchd_env, daemons):
    """A hand-run `batchd sync` (here: a process holding the worker lock) makes the daemon skip its steps with
    a warning, without backoff or a failure count; once it is done the daemon carries on."""
    import sys

    from tests.test_cli import HOLD_LOCK

    cfg = daemon_config(tmp_path)
    enqueue(cfg, batchd_env, [f"chunk {i}" for i in range(5)])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cfg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=batchd_env)
    try:
        assert holder.stdout.readline().strip() == "held"
        d = daemons(cfg, batchd_env)
        busy = d.wait_event("daemon.step_busy")
        assert f"pid {holder.pid}" in busy["reason"] and busy["level"] == "warning"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 5, what="all chunks READY after the lock is free")
    assert not [e for e in d.events() if e["event"] == "daemon.step_failed"]
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
