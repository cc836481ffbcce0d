"""batch-worker.service under a REAL systemd 252 (PID 1 of throwaway namespaces, ../shared/tools/boot-systemd.sh).

The shipped unit is installed with ExecStart= pointed at this checkout's virtual environment, plus a test drop-in
(PYTHONPATH for the test backend, a 2s watchdog, a 1s restart delay, and the interpreter's folder made visible
when it lives under /root or /home, which the unit's ProtectHome= hides). The service's state directory is
bind-mounted from tmp so the test reads the database rows directly, as the application would.

The tests share one instance and run in file order: start, enqueue, journal, watchdog, stop, oneshot, bad config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MEMBACKEND, REPO
from tests.fakes.membackend import set_knobs
from tests.test_daemon import counts, wait_until

TOOL = REPO.parent / "shared" / "tools" / "boot-systemd.sh"
UNIT = "batch-worker.service"
ONCE = REPO / "packaging" / "systemd" / "batch-worker-once.service"
EXE = Path(sys.executable).parent / "batchd"  # this environment's console script
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
    if not EXE.exists():
        return "the batchd console script is not installed in this environment"
    return None


class Instance:
    def __init__(self, handle: str, tmp: Path):
        self.handle = handle
        self.tmp = tmp  # host side: files to copy in
        self.state = tmp / "state"  # host side of /var/lib/batchd

    def run(self, *cmd: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(TOOL), "exec", self.handle, *cmd], capture_output=True, timeout=timeout,
                              input=input)

    def x(self, *cmd: str, check: bool = True, timeout: float = 60, input: bytes | None = None) -> str:
        r = self.run(*cmd, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout.decode()}\n{r.stderr.decode()}")
        return r.stdout.decode()

    def as_user(self, user: str, *cmd: str, check: bool = True, timeout: float = 60,
                input: bytes | None = None) -> str:
        return self.x("setpriv", "--reuid", user, "--regid", user, "--init-groups", *cmd, check=check,
                      timeout=timeout, input=input)

    def batchd(self, *args: str, env: tuple[str, ...] = (), check: bool = True, timeout: float = 60,
               input: bytes | None = None) -> str:
        """`batchd --config /etc/batchd/batchd.toml ARGS` inside the instance as the service user (with ``env``:
        VAR=value settings), the way the application would share the file."""
        return self.as_user("batchd", *(["env", *env] if env else []), str(EXE), "--config",
                            "/etc/batchd/batchd.toml", *args, check=check, timeout=timeout, input=input)

    def install_config(self, text: str) -> None:
        """``text`` as /etc/batchd/batchd.toml, root:batchd 0640 (README step 3)."""
        (self.tmp / "batchd.toml").write_text(text)
        self.cp_in(self.tmp / "batchd.toml", "/tmp/batchd.toml")
        self.x("install", "-m", "0640", "-g", "batchd", "/tmp/batchd.toml", "/etc/batchd/batchd.toml")

    def start_app(self, script: str) -> subprocess.Popen[str]:
        """The application: ``script`` run by Debian's python3 as user myapp, once it has printed "ready"."""
        app = subprocess.Popen([str(TOOL), "exec", self.handle, "setpriv", "--reuid", "myapp", "--regid", "myapp",
                                "--init-groups", "/usr/bin/python3", "-c", script],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert app.stdout is not None and app.stdin is not None
        if app.stdout.readline().strip() != "ready":
            app.kill()
            raise AssertionError(f"the application did not start: {app.stderr.read() if app.stderr else ''}")
        return app

    def cp_in(self, src: Path, dst: str) -> None:
        subprocess.run([str(TOOL), "cp-in", self.handle, str(src), dst], check=True, timeout=60)

    def prop(self, name: str) -> str:
        return self.x("systemctl", "show", "-P", name, UNIT).strip()

    def enqueue(self, texts: list[str]) -> None:
        """`batchd enqueue` on the test backend (importable through PYTHONPATH)."""
        self.batchd("enqueue", env=(f"PYTHONPATH={REPO}",),
                    input="".join(json.dumps({"text": t}) + "\n" for t in texts).encode())

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


@contextlib.contextmanager
def _booted(tmp: Path) -> Iterator[Instance]:
    """A throwaway systemd seeing this checkout and its virtual environment, with tmp/state bind-mounted as
    /var/lib/batchd; stopped at the end. Skips the test when this machine cannot run one."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    (tmp / "state").mkdir()
    venv = Path(sys.prefix)
    binds = ["--bind", str(REPO), "--bind", f"{tmp / 'state'}:/var/lib/batchd"]
    if REPO not in venv.parents and venv != REPO:
        binds += ["--bind", str(venv)]
    r = subprocess.run([str(TOOL), "start", *binds], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"boot-systemd.sh start failed: {r.stderr}")
    inst = Instance(r.stdout.strip().splitlines()[-1], tmp)
    try:
        yield inst
    finally:
        subprocess.run([str(TOOL), "stop", inst.handle], capture_output=True, timeout=120)


def _python_visible(inst: Instance) -> list[str]:
    """Drop-in lines that show this interpreter to the unit when it lives under /root or /home (which the unit's
    ProtectHome=yes hides), its top folder made enterable inside the instance only (overlay); else none."""
    base = Path(sys.base_prefix).resolve()
    if not any(base.is_relative_to(h) for h in ("/root", "/home")):
        return []
    inst.x("chmod", "o+x", str(Path(*base.parts[:2])))
    return ["ProtectHome=tmpfs", f"BindReadOnlyPaths={base}"]


def _unit_file(shipped: Path) -> str:
    """A shipped unit with ExecStart= pointed at this environment's batchd."""
    return shipped.read_text().replace("/opt/batchd/bin/batchd", str(EXE))


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory):
    started = time.monotonic()
    with _booted(tmp_path_factory.mktemp("systemd")) as inst:
        print(f"\nsystemd booted in {time.monotonic() - started:.2f}s")
        _install(inst, inst.tmp)
        yield inst
    print(f"real-systemd tests: {time.monotonic() - started:.1f}s including boot and teardown")


def _install(inst: Instance, tmp: Path) -> None:
    (tmp / UNIT).write_text(_unit_file(REPO / "packaging" / "systemd" / UNIT))
    (tmp / ONCE.name).write_text(_unit_file(ONCE))
    dropin = ["[Service]", f"Environment=PYTHONPATH={REPO}", *_python_visible(inst)]
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


def test_parse_workers_run_inside_the_units_sandbox(sd: Instance):
    """The parse workers are subprocesses of the service: the unit's sandbox (NoNewPrivileges, the system call
    filter, the read-only file system...) must let them start, or every big job would fall back in-process."""
    raw = CONFIG.replace(MEMBACKEND, "tests.fakes.membackend:RawScriptedBackend") + "[daemon]\nparse_workers = 2\n"
    sd.install_config(raw)
    before = len(sd.events())
    sd.x("systemctl", "restart", UNIT)
    try:
        sd.enqueue(texts("w", 30))
        wait_until(lambda: db(sd)["ready"] == 382, what="30 chunks READY through the parse workers")
        names = [e["event"] for _, e in sd.events()[before:]]
        assert "job.parse_workers" in names and "job.parse_workers_unavailable" not in names, names
        started = [e for _, e in sd.events()[before:] if e["event"] == "job.parse_workers"]
        assert started[-1]["workers"] == 2
    finally:
        sd.x("systemctl", "stop", UNIT)  # as the tests before left it
        sd.install_config(CONFIG)


def test_bad_config_fails_once_with_78_and_no_restart_loop(sd: Instance, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG + '[daemon]\nlog_levle = "debug"\n')
    sd.cp_in(bad, "/etc/batchd/batchd.toml")
    assert sd.run("systemctl", "start", UNIT).returncode != 0
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


# ----------------------------------------------------------------------------------------- the operator's path
#
# Issue 11's "test it as an operator would": a second throwaway systemd, set up by following the README's service
# section with the local backend (`backend = "local"`, the packaged model), step by step. Deviations, because a
# test cannot do them: the virtual environment is this checkout's (bind-mounted; when its Python lives under /root
# the test drop-in makes it visible, as test.conf does above), `sudo -u batchd` is `setpriv`, and the state
# folder is bind-mounted from tmp so the test can read the rows.

LOCAL_CONFIG = """
[database]
path = "/var/lib/batchd/batchd.db"
[queue]
min_batch_size = 1
flush_interval = "1s"
sync_interval = "1s"
[embedding]
backend = "local"
model = "all-MiniLM-L6-v2"
dimensions = 384
[local]
slice_size = 4
batch_size = 4
"""

# The application: Debian's /usr/bin/python3 with its stdlib sqlite3 (no sqlite-vec), user myapp (primary group
# myapp, member of batchd), umask 022. It opens the database FIRST (creating -wal/-shm), inserts 20 rows, says
# "ready", then inserts 40 more while the service runs, keeping its connection open throughout.
APP = r"""
import os, sqlite3, sys, time
os.umask(0o022)
db = sqlite3.connect("/var/lib/batchd/batchd.db", timeout=30)
db.execute("PRAGMA journal_mode = WAL")
db.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL)")
def add(i):
    with db:
        db.execute("INSERT INTO chunks (content) VALUES (?)", (f"operator test paragraph {i}: the app writes it",))
for i in range(20):
    add(i)
print("ready", flush=True)
sys.stdin.readline()  # the test says when the service is up
for i in range(20, 60):
    add(i)
    time.sleep(0.1)
print("done", flush=True)
sys.stdin.readline()
db.close()
"""


@pytest.fixture(scope="module")
def op(tmp_path_factory: pytest.TempPathFactory):
    if _skip_reason() is None:
        try:
            import sentence_transformers
        except ImportError:
            pytest.skip("the local backend is not installed in this environment (pip install -e '.[local]')")
    with _booted(tmp_path_factory.mktemp("operator")) as inst:
        yield inst, inst.tmp


def _batchd(inst: Instance, *args: str, check: bool = True) -> str:
    """`batchd ARGS` as the service user, as the README has the operator run it (no test PYTHONPATH)."""
    return inst.batchd(*args, check=check, timeout=300)


def test_operator_path_local_backend_shared_database(op: tuple[Instance, Path]):
    inst, tmp = op
    t0 = time.monotonic()
    # README step 2: user and group, the application's user in the group, the setgid state folder, the database
    # file made group-writable up front.
    inst.x("useradd", "--system", "--home-dir", "/var/lib/batchd", "--shell", "/usr/sbin/nologin", "batchd")
    inst.x("useradd", "--create-home", "--user-group", "myapp")
    inst.x("usermod", "-aG", "batchd", "myapp")
    inst.x("install", "-d", "-m", "2770", "-o", "batchd", "-g", "batchd", "/var/lib/batchd")
    inst.x("install", "-m", "0660", "-o", "batchd", "-g", "batchd", "/dev/null", "/var/lib/batchd/batchd.db")
    python_visible = _python_visible(inst)
    in_home = bool(python_visible)
    # Step 3: the configuration, then `check` as the service user.
    inst.x("install", "-d", "-m", "0755", "/etc/batchd")
    inst.install_config(LOCAL_CONFIG)
    check = _batchd(inst, "check", check=False)
    print(check)
    assert "FAIL" not in check and "ok    database folder" in check, check
    assert ("WARN  python:" in check) == in_home
    # Step 4: the unit and the local backend's drop-in, as shipped.
    (tmp / UNIT).write_text(_unit_file(REPO / "packaging" / "systemd" / UNIT))
    inst.cp_in(tmp / UNIT, f"/etc/systemd/system/{UNIT}")
    inst.x("install", "-D", "-m", "0644", str(REPO / "packaging" / "systemd" / "local-backend.conf"),
           f"/etc/systemd/system/{UNIT}.d/local-backend.conf")
    test_dropin = ["[Service]", "RestartSec=1s", *python_visible]
    (tmp / "test.conf").write_text("\n".join(test_dropin) + "\n")
    inst.cp_in(tmp / "test.conf", f"/etc/systemd/system/{UNIT}.d/test.conf")
    inst.x("systemctl", "daemon-reload")
    assert inst.prop("MemoryDenyWriteExecute") == "no" and inst.prop("ProcSubset") == "all"

    # The application opens the database first (its -wal/-shm are created by myapp), then the service starts.
    app = inst.start_app(APP)
    try:
        assert app.stdout is not None and app.stdin is not None
        ls = inst.x("stat", "-c", "%n %U:%G %a", "/var/lib/batchd", "/var/lib/batchd/batchd.db",
                    "/var/lib/batchd/batchd.db-wal", "/var/lib/batchd/batchd.db-shm")
        print(ls)
        assert "batchd.db-wal myapp:batchd 660" in ls and "batchd.db-shm myapp:batchd 660" in ls
        inst.x("systemctl", "enable", "--now", UNIT, timeout=300)
        print(f"operator path: service active {time.monotonic() - t0:.1f}s after the first step")
        assert inst.x("systemctl", "is-active", UNIT).strip() == "active"
        app.stdin.write("go\n")
        app.stdin.flush()

        statuses: set[str] = set()

        def all_ready() -> bool:
            statuses.add(inst.prop("StatusText"))
            return db(inst)["ready"] == 60

        wait_until(all_ready, timeout=300, what="60 rows READY")
        assert app.stdout.readline().strip() == "done"
        app.stdin.write("close\n")
        app.stdin.flush()
        assert app.wait(timeout=60) == 0
    finally:
        if app.poll() is None:
            app.kill()
    print("statuses seen:", sorted(statuses))
    assert db(inst) == {"pending": 0, "running": 0, "ready": 60, "failed": 0}
    assert any(re.match(r"embedding batch \d+: [\d,]+/[\d,]+ \(\d+/s\)", s) for s in statuses), statuses
    assert inst.prop("NRestarts") == "0"

    # The journal: every line batchd's process wrote is one JSON object (jq -e fails on anything else).
    r = inst.run("sh", "-c", f"journalctl --no-pager -u {UNIT} -t batchd -o cat | jq -e . > /dev/null")
    assert r.returncode == 0, r.stderr.decode()
    events = [e for _, e in inst.events()]
    names = [e["event"] for e in events]
    assert "daemon.ready" in names and "batch.progress" in names
    assert not [e for e in events if e["event"] == "foreign.output" and "cpuinfo" in e.get("message", "")]
    assert not [e for e in events if e["level"] == "error"], [e for e in events if e["level"] == "error"]

    # Reload: a new flush_interval applies without a restart.
    pid = inst.prop("MainPID")
    inst.install_config(LOCAL_CONFIG.replace('flush_interval = "1s"', 'flush_interval = "3s"'))
    inst.x("systemctl", "reload", UNIT)
    rec, e = inst.wait_event("config.reloaded", applied=["queue.flush_interval"])
    assert e["values"] == {"queue.flush_interval": 3.0}
    assert inst.prop("MainPID") == pid and inst.x("systemctl", "is-active", UNIT).strip() == "active"
    jobs = _batchd(inst, "jobs", "--json")
    assert all(json.loads(line)["error_message"] is None for line in jobs.splitlines()), jobs

    # A dimensions change that does not fit the database: exit 78 with a config.invalid event, no restart loop.
    seen = len(inst.events())
    inst.install_config(LOCAL_CONFIG.replace("dimensions = 384", "dimensions = 256"))
    inst.x("systemctl", "restart", UNIT, check=False, timeout=300)
    wait_until(lambda: inst.prop("ActiveState") in ("failed", "inactive"), timeout=120, what="the service stopped")
    time.sleep(3)  # RestartSec=1s: a restart loop would have begun by now
    assert inst.prop("ExecMainStatus") == "78" and inst.prop("NRestarts") == "0"
    assert inst.prop("ActiveState") in ("failed", "inactive")
    invalid = [e for _, e in inst.events()[seen:] if e["event"] == "config.invalid"]
    assert invalid and "256" in json.dumps(invalid[0]) and "384" in json.dumps(invalid[0]), invalid

    # Back to 384, then reset-vectors (the operator's way to start over): every chunk is embedded again.
    inst.install_config(LOCAL_CONFIG)
    dry = _batchd(inst, "reset-vectors")
    assert db(inst)["ready"] == 60, dry  # without --yes nothing changes
    _batchd(inst, "reset-vectors", "--yes")
    assert db(inst)["ready"] == 0
    inst.x("systemctl", "start", UNIT, timeout=300)
    wait_until(lambda: db(inst)["ready"] == 60, timeout=300, what="60 rows READY again after reset-vectors")
    assert db(inst) == {"pending": 0, "running": 0, "ready": 60, "failed": 0}
    print(f"operator path: {time.monotonic() - t0:.1f}s")


BAD_APP = r"""
import os, sqlite3, sys
os.umask(0o022)
db = sqlite3.connect("/srv/app/app.db")
db.execute("PRAGMA journal_mode = WAL")
db.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL)")
with db:
    db.execute("INSERT INTO chunks (content) VALUES ('a row of the app')")
os.system("chgrp batchd /srv/app/app.db && chmod g+w /srv/app/app.db")  # the file, but not its -wal/-shm
print("ready", flush=True)
sys.stdin.readline()
db.close()
"""


def test_app_files_without_the_readme_steps_fail_the_start_instead_of_ready(op: tuple[Instance, Path]):
    """The issue's lock-out: the application holds the database open, its -wal/-shm made as myapp:myapp 0644
    (no setgid folder, no group-writable file before the first open). The service must not report READY on a
    database it cannot write: `systemctl start` fails, and the journal says which file is whose."""
    inst, tmp = op
    inst.x("systemctl", "stop", UNIT)
    inst.x("install", "-d", "-m", "0775", "-o", "myapp", "-g", "batchd", "/srv/app")
    inst.install_config(LOCAL_CONFIG.replace("/var/lib/batchd/batchd.db", "/srv/app/app.db"))
    (tmp / "rw.conf").write_text("[Service]\nReadWritePaths=/srv/app\nRestart=no\n")
    inst.cp_in(tmp / "rw.conf", f"/etc/systemd/system/{UNIT}.d/rw.conf")
    inst.x("systemctl", "daemon-reload")
    app = inst.start_app(BAD_APP)
    try:
        assert app.stdin is not None
        print(inst.x("stat", "-c", "%n %U:%G %a", "/srv/app/app.db", "/srv/app/app.db-wal", "/srv/app/app.db-shm"))
        check = _batchd(inst, "check", check=False)
        print(check)
        assert "FAIL  file app.db-wal" in check and "FAIL  file app.db-shm" in check
        before = len(inst.events())
        assert inst.run("systemctl", "start", UNIT, timeout=300).returncode != 0  # never READY=1
        rec, e = inst.wait_event("database.unusable", after=before)
        print(e["error"])
        assert rec["PRIORITY"] == "3" and e["database"] == "/srv/app/app.db" and "read-only" in e["error"], e
        # Inside the unit's user namespace (PrivateUsers=yes) the application's user shows as nobody.
        assert re.search(r"app\.db-wal (myapp:myapp|nobody:nogroup) 0644", e["error"]), e["error"]
        assert inst.prop("NRestarts") == "0"
        app.stdin.write("close\n")
        app.stdin.flush()
        app.wait(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
