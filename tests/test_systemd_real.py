"""batch-worker.service under a REAL systemd 252 (PID 1 of throwaway namespaces, ../shared/tools/boot-systemd.sh).

The shipped unit is installed with ExecStart= pointed at this checkout's virtual environment, plus a test drop-in
(PYTHONPATH for the test backend, a 2s watchdog, a 1s restart delay, and the interpreter's folder made visible
when it lives under /root or /home, which the unit's ProtectHome= hides). The service's state directory is
bind-mounted from tmp so the test reads the database rows directly, as the application would.

The tests share one instance and run in file order: start, enqueue, journal, watchdog, stop, oneshot, bad config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MEMBACKEND, REPO
from tests.fakes.membackend import set_knobs
from tests.test_daemon import counts, wait_until

TOOL = REPO.parent / "shared" / "tools" / "boot-systemd.sh"
UNIT = "batch-worker.service"
ONCE = REPO / "packaging" / "systemd" / "batch-worker-once.service"
CONFIG = f"""
[database]
path = "/var/lib/batchd/batchd.db"
[queue]
min_batch_size = 1
max_batch_size = 5000
flush_interval = "0.5s"
sync_interval = "0.5s"
max_attempts = 20  # the permanent-failure phase may fail a few submits before the test lifts the knob
[embedding]
backend = "{MEMBACKEND}"
model = "test-model"
dimensions = 16
"""

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


def _skip_reason() -> str | None:
    if not TOOL.exists():
        return f"{TOOL} is absent (only in the team checkout with ../shared): real-systemd test skipped"
    if os.geteuid() != 0:
        return "boot-systemd.sh needs root"
    if not (Path("/lib/systemd/systemd").exists() or Path("/usr/lib/systemd/systemd").exists()):
        return "systemd is not installed"
    if not (Path(sys.executable).parent / "batchd").exists():
        return "the batchd console script is not installed in this environment"
    return None


class Instance:
    def __init__(self, handle: str, state: Path):
        self.handle = handle
        self.state = state  # host side of /var/lib/batchd

    def x(self, *cmd: str, check: bool = True, timeout: float = 60, input: bytes | None = None) -> str:
        r = subprocess.run([str(TOOL), "exec", self.handle, *cmd], capture_output=True, timeout=timeout,
                           input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout.decode()}\n{r.stderr.decode()}")
        return r.stdout.decode()

    def cp_in(self, src: Path, dst: str) -> None:
        subprocess.run([str(TOOL), "cp-in", self.handle, str(src), dst], check=True, timeout=60)

    def prop(self, name: str) -> str:
        return self.x("systemctl", "show", "-P", name, UNIT).strip()

    def as_app(self, *args: str, input: bytes | None = None) -> str:
        """`batchd` run inside the instance as the service user, the way the application would share the file."""
        return self.x("setpriv", "--reuid", "batchd", "--regid", "batchd", "--init-groups", "env",
                      f"PYTHONPATH={REPO}", str(Path(sys.executable).parent / "batchd"), "--config",
                      "/etc/batchd/batchd.toml", *args, input=input)

    def enqueue(self, texts: list[str]) -> None:
        self.as_app("enqueue", input="".join(json.dumps({"text": t}) + "\n" for t in texts).encode())

    def journal(self) -> list[dict[str, Any]]:
        out = self.x("journalctl", "--no-pager", "-u", UNIT, "-o", "json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(journal record, parsed JSON log line) for every line batchd wrote."""
        out = []
        for rec in self.journal():
            if rec.get("SYSLOG_IDENTIFIER") == "batchd" and rec.get("_TRANSPORT") == "stdout":
                out.append((rec, json.loads(rec["MESSAGE"])))
        return out

    def wait_event(self, name: str, after: int = 0, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        def find() -> Any:
            for rec, e in self.events()[after:]:
                if e["event"] == name and all(e.get(k) == v for k, v in fields.items()):
                    return rec, e
            return None

        return wait_until(find, timeout, f"journal event {name} {fields}")


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("systemd")
    state = tmp / "state"
    state.mkdir()
    venv = Path(sys.prefix)
    binds = ["--bind", str(REPO), "--bind", f"{state}:/var/lib/batchd"]
    if REPO not in venv.parents and venv != REPO:
        binds += ["--bind", str(venv)]
    started = time.monotonic()
    r = subprocess.run([str(TOOL), "start", *binds], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"boot-systemd.sh start failed: {r.stderr}")
    inst = Instance(r.stdout.strip().splitlines()[-1], state)
    print(f"\nsystemd booted in {time.monotonic() - started:.2f}s")
    try:
        _install(inst, tmp)
        yield inst
    finally:
        subprocess.run([str(TOOL), "stop", inst.handle], capture_output=True, timeout=120)
        print(f"real-systemd tests: {time.monotonic() - started:.1f}s including boot and teardown")


def _install(inst: Instance, tmp: Path) -> None:
    exe = Path(sys.executable).parent / "batchd"
    unit = (REPO / "packaging" / "systemd" / UNIT).read_text().replace("/opt/batchd/bin/batchd", str(exe))
    (tmp / UNIT).write_text(unit)
    once = ONCE.read_text().replace("/opt/batchd/bin/batchd", str(exe))
    (tmp / ONCE.name).write_text(once)
    dropin = ["[Service]", f"Environment=PYTHONPATH={REPO}"]
    base = Path(sys.base_prefix).resolve()
    if any(base.is_relative_to(h) for h in ("/root", "/home")):
        # The unit hides /root and /home (ProtectHome=yes); this interpreter lives there.
        dropin += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={base}"]
        inst.x("chmod", "o+x", str(Path(*base.parts[:2])))  # inside the instance only (overlay)
    (tmp / "once.conf").write_text("\n".join(dropin) + "\n")
    (tmp / "test.conf").write_text("\n".join([*dropin, "WatchdogSec=2s", "RestartSec=1s"]) + "\n")
    (tmp / "batchd.toml").write_text(CONFIG)
    inst.x("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "batchd")
    inst.cp_in(tmp / UNIT, f"/etc/systemd/system/{UNIT}")
    inst.x("mkdir", "-p", f"/etc/systemd/system/{UNIT}.d", "/etc/batchd")
    inst.cp_in(tmp / "test.conf", f"/etc/systemd/system/{UNIT}.d/test.conf")
    inst.cp_in(tmp / "batchd.toml", "/etc/batchd/batchd.toml")
    inst.cp_in(tmp / ONCE.name, f"/etc/systemd/system/{ONCE.name}")
    inst.x("mkdir", "-p", f"/etc/systemd/system/{ONCE.name}.d")
    inst.cp_in(tmp / "once.conf", f"/etc/systemd/system/{ONCE.name}.d/test.conf")
    inst.x("systemctl", "daemon-reload")


def knobs(inst: Instance, **values: Any) -> None:
    set_knobs(inst.state / "testbackend", **values)


def db(inst: Instance) -> dict[str, int]:
    return counts(inst.state / "batchd.db")


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} private chunk text {i}" for i in range(n)]


# ----------------------------------------------------------------------------------------- the tests


def test_start_returns_after_ready_and_status_shows_counts(sd: Instance):
    t0 = time.monotonic()
    sd.x("systemctl", "start", UNIT)
    print(f"systemctl start returned after {time.monotonic() - t0:.2f}s")
    # Type=notify: `start` returned, so READY=1 arrived; the unit is active at once, not "activating".
    assert sd.x("systemctl", "is-active", UNIT).strip() == "active"
    assert sd.prop("NotifyAccess") == "main" and sd.prop("WatchdogUSec") == "2s"
    events = [e["event"] for _, e in sd.events()]
    assert "daemon.ready" in events
    status = sd.x("systemctl", "status", "--no-pager", UNIT, check=False)
    print(status)
    assert "Active: active (running)" in status
    assert 'Status: "pending=0 running=0 ready=0 failed=0' in status


def test_chunks_enqueued_while_running_end_ready(sd: Instance):
    sd.enqueue(texts("a", 40))
    wait_until(lambda: db(sd)["ready"] == 40, what="40 chunks READY")
    wait_until(lambda: "ready=40" in sd.prop("StatusText"), what="STATUS ready=40")
    print("StatusText:", sd.prop("StatusText"))


def test_journal_lines_are_json_and_errors_have_priority_3(sd: Instance):
    knobs(sd, submit_permanent="400 simulated: model not found")
    sd.enqueue(texts("b", 2))
    rec, event = sd.wait_event("batch.submit_failed")
    knobs(sd)
    assert rec["PRIORITY"] == "3" and event["level"] == "error" and event["batch_id"]
    assert not rec["MESSAGE"].startswith("<")  # journald stripped the prefix
    wait_until(lambda: db(sd)["ready"] == 42, what="the 2 chunks READY on the next attempt")

    cat = sd.x("journalctl", "--no-pager", "-u", UNIT, "-t", "batchd", "-o", "cat")
    lines = cat.splitlines()
    assert len(lines) > 10
    for line in lines:
        e = json.loads(line)
        assert {"timestamp", "level", "event", "logger"} <= set(e)
        assert "private chunk text" not in line
    priorities = {rec["PRIORITY"] for rec, _ in sd.events()}
    assert {"3", "6"} <= priorities
    assert "3" in {r["PRIORITY"] for r in json.loads("[" + ",".join(
        sd.x("journalctl", "--no-pager", "-u", UNIT, "-p", "err", "-o", "json").splitlines()) + "]")
        if r.get("SYSLOG_IDENTIFIER") == "batchd"}


def test_wedged_worker_is_killed_by_the_watchdog_and_restarted(sd: Instance):
    assert sd.prop("NRestarts") == "0"
    pid0 = sd.prop("MainPID")
    knobs(sd, hang_submits=1)  # the next submit hangs without progress
    sd.enqueue(texts("c", 5))
    t0 = time.monotonic()
    wait_until(lambda: sd.prop("NRestarts") == "1", timeout=60, what="a watchdog restart")
    print(f"watchdog restart {time.monotonic() - t0:.1f}s after the enqueue (WatchdogSec=2s)")
    wait_until(lambda: sd.x("systemctl", "is-active", UNIT, check=False).strip() == "active", what="active again")
    assert sd.prop("MainPID") != pid0
    system = [r["MESSAGE"] for r in sd.journal() if r.get("SYSLOG_IDENTIFIER") == "systemd"]
    assert any("Watchdog timeout" in m for m in system), system[-10:]
    stalled = [e for _, e in sd.events() if e["event"] == "watchdog.stalled"]
    assert stalled and stalled[-1]["step"] == "flush"
    # The restarted worker recovers the claimed batch (submitting it once) and completes the queue.
    wait_until(lambda: db(sd)["ready"] == 47, what="the wedged chunks READY after the restart")
    assert sd.prop("NRestarts") == "1"


def test_stop_during_a_sync_ends_with_result_success(sd: Instance):
    knobs(sd, result_delay=0.02)  # 300 lines take 6s to stream; progress every 50 lines
    before = len(sd.events())
    sd.enqueue(texts("d", 300))
    sd.wait_event("job.state", after=before, state="SUCCEEDED")
    time.sleep(0.3)
    t0 = time.monotonic()
    sd.x("systemctl", "stop", UNIT)
    took = time.monotonic() - t0
    print(f"systemctl stop during a sync: {took:.2f}s")
    assert sd.prop("Result") == "success" and sd.prop("ExecMainStatus") == "0"
    names = [e["event"] for _, e in sd.events()[before:]]
    assert "sync.stopped" in names and names[-1] == "daemon.stopped"
    mid = db(sd)
    assert 47 <= mid["ready"] < 347 and mid["running"] == 347 - mid["ready"], mid

    knobs(sd)
    sd.x("systemctl", "start", UNIT)  # the next run finishes the job
    wait_until(lambda: db(sd)["ready"] == 347, what="the interrupted batch applied by the next run")
    sd.x("systemctl", "stop", UNIT)
    assert sd.prop("Result") == "success"


def test_oneshot_unit_runs_one_cycle(sd: Instance):
    sd.enqueue(texts("e", 5))
    sd.x("systemctl", "start", ONCE.name)  # Type=oneshot: returns when the cycle is over
    show = dict(line.split("=", 1) for line in sd.x("systemctl", "show", "-p", "Result", "-p", "ExecMainStatus",
                                                    ONCE.name).splitlines())
    assert show == {"Result": "success", "ExecMainStatus": "0"}
    assert db(sd) == {"pending": 0, "running": 0, "ready": 352, "failed": 0}


def test_bad_config_fails_once_with_78_and_no_restart_loop(sd: Instance, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG + '[daemon]\nlog_levle = "debug"\n')
    sd.cp_in(bad, "/etc/batchd/batchd.toml")
    r = subprocess.run([str(TOOL), "exec", sd.handle, "systemctl", "start", UNIT], capture_output=True, timeout=60)
    assert r.returncode != 0
    time.sleep(3)  # three RestartSec= periods: a restart loop would show by now
    assert sd.prop("ExecMainStatus") == "78"
    assert sd.prop("ActiveState") == "failed" and sd.prop("Result") == "exit-code"
    assert sd.prop("NRestarts") == "0"
    rec, event = sd.events()[-1]
    assert event["event"] == "config.invalid" and "daemon.log_levle: unknown key" in event["error"]
    assert rec["PRIORITY"] == "3"
    cat = sd.x("journalctl", "--no-pager", "-u", UNIT, "-t", "batchd", "-o", "cat").splitlines()
    assert all(json.loads(line)["event"] for line in cat)  # even the start-up failure is a JSON event


def test_tool_is_where_tests_look_for_it():
    assert TOOL.name == "boot-systemd.sh" and shutil.which("bash")
