"""batchd.systemd in-process: sd_notify datagrams on a real socket, watchdog_interval, Health."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from batchd.daemon import StepState
from batchd.systemd import Health, Notifier, Watchdog, watchdog_interval


@pytest.fixture
def notify(tmp_path) -> Iterator[tuple[socket.socket, Notifier]]:
    """systemd's side (a bound datagram socket, 5 s receive timeout) and a Notifier sending to it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        yield s, n
        n.close()


def test_notifier_sends_datagrams(notify):
    s, n = notify
    assert n.enabled
    n.ready("pending=1 running=0 ready=0 failed=0")
    n.status("two\nlines — and a dash")
    n.watchdog()
    n.stopping()
    n.close()
    got = [s.recv(4096).decode("latin-1") for _ in range(4)]
    assert got[0].split("\n") == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=pending=1 running=0 ready=0 failed=0"]
    assert got[1] == "STATUS=two lines ? and a dash"  # one line, latin-1
    assert got[2] == "WATCHDOG=1" and got[3] == "STOPPING=1"


def test_without_notify_socket_everything_is_off():
    n = Notifier({})
    assert not n.enabled
    n.ready("x")
    n.watchdog()
    n.stopping()
    n.close()


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "120000000"}) == 120.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None  # meant for another pid
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_health_is_fine_when_idle_and_stalls_inside_a_step():
    now = [100.0]
    h = Health(clock=lambda: now[0])
    now[0] += 1000
    assert h.stalled_for() == (None, 0.0)  # idle between steps: healthy however long
    h.begin("sync")
    now[0] += 5
    h.progress()
    now[0] += 3
    assert h.stalled_for() == ("sync", 3.0)
    h.end()
    assert h.stalled_for() == (None, 0.0)


def test_watchdog_pings_only_while_healthy(notify):
    s, n = notify
    now = [0.0]
    h = Health(clock=lambda: now[0])
    h.begin("flush")
    now[0] = 10.0  # stalled for 10s with a 1s interval: the first loop turn must not ping
    dog = Watchdog(n, h, interval=0.2)
    dog.start()
    s.settimeout(0.5)
    try:
        s.recv(64)
        raised = False
    except TimeoutError:
        raised = True
    assert raised and dog.pings == 0
    h.progress()
    s.settimeout(5)
    assert s.recv(64) == b"WATCHDOG=1"
    dog.stop()


def test_step_backoff_grows_and_is_capped():
    st = StepState("sync", interval=60)
    delays = [st.failed(0.0, "boom") for _ in range(6)]
    assert delays[0] == 0  # retried at the next tick
    assert delays[1:4] == [60, 180, 420]
    assert max(delays) == 600  # capped at MAX_BACKOFF
    st.succeeded()
    assert st.consecutive == 0 and st.retry_at == 0
    big = StepState("sync", interval=3600)
    big.failed(0, "x")
    assert big.failed(0, "x") == 3600  # never capped below one interval
