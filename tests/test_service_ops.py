"""The operator's side of the daemon (issue 11): progress and failures in STATUS=, reload, a clean JSON journal
even with foreign output on fd 1/2, files that stay usable by the service's group and private to it.

In-process where the worker can be stepped by hand (the real Worker, real store, the file-backed test backend);
`batchd run` as a subprocess where signals, file descriptors or exit codes are the point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from batchd import daemon
from batchd.reload import reload
from batchd.store import lock_path
from batchd.systemd import Notifier
from tests.configs import daemon_config, write_config
from tests.conftest import batchd_cmd, on_a_terminal
from tests.fakes.membackend import set_knobs
from tests.test_daemon import NotifySocket, counts, daemons, enqueue, texts, wait_until

PROGRESS = re.compile(r"reading batch (\d+): (\d+)/(\d+) \((\d+)/s\)")


@pytest.fixture
def notify(tmp_path: Path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def _worker(w: Any, notify: NotifySocket | None = None) -> daemon.Worker:
    return daemon.Worker(w.manager, notifier=Notifier({"NOTIFY_SOCKET": str(notify.path)} if notify else {}))


# ------------------------------------------------------------------------------------ progress, failures


def test_status_shows_progress_while_a_batch_is_read_and_an_event_per_5_slices(world, notify):
    w = world()
    w.knobs(result_delay=0.01)  # 300 lines take ~3 s; the test backend reports progress every 50 lines
    w.manager.enqueue([(None, t) for t in texts("p", 300)])
    worker = _worker(w, notify)
    assert worker.flush(force=True).ok
    with structlog.testing.capture_logs() as logs:
        assert worker.sync().ok
    statuses = [s for _, s in notify.assignments("STATUS")]
    progress = [PROGRESS.search(s) for s in statuses]
    seen = [(int(m.group(2)), int(m.group(3))) for m in progress if m]
    print(statuses)
    assert seen[0] == (0, 300)  # at the start of the read
    assert any(0 < done < 300 for done, _ in seen), seen  # updated while it runs (every 2 s at most)
    events = [e for e in logs if e["event"] == "batch.progress"]
    assert events and events[0]["total"] == 300 and events[0]["done"] == 250 and events[0]["per_s"] > 0
    assert counts(Path(w.config.database.path))["ready"] == 300
    assert "reading batch" not in worker.status_line()  # the activity ends with the step


def test_a_batch_that_keeps_failing_is_in_status_then_an_error_and_leaves_no_error_once_it_succeeds(world):
    w = world()
    w.manager.enqueue([(None, t) for t in texts("f", 3)])
    worker = _worker(w)
    assert worker.flush(force=True).ok
    w.knobs(results_error="RuntimeError: could not create a primitive")
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            worker.sync()
    failed = [e for e in logs if e["event"] == "job.results_failed"]
    assert [e["log_level"] for e in failed] == ["warning", "warning", "error"]
    assert failed[-1]["consecutive_failures"] == 3
    line = worker.status_line()
    assert "sync failing (3x): batch 1: RuntimeError: could not create a primitive" in line, line
    assert "will retry" in (w.store.batch(1).error_message or "")

    w.knobs()
    worker.sync()
    b = w.store.batch(1)
    assert b.status == "COMPLETED" and b.error_message is None  # no stale error on a successful batch
    assert "failing" not in worker.status_line()
    assert w.manager.get_queue_stats()["ready"] == 3


# ------------------------------------------------------------------------------------ reload


def test_reload_applies_live_keys_names_restart_keys_and_keeps_the_config_when_the_file_is_invalid(
        world, tmp_path):
    w = world()
    worker = _worker(w)
    path = tmp_path / "batchd.toml"
    base = Path(w.config.source)
    assert base == path
    write_config(path, {
        "database": {"path": w.config.database.path},
        "queue": {"min_batch_size": 7, "max_batch_size": 1000, "max_attempts": 3, "flush_interval": "2s",
                  "max_running_jobs": 9},
        "embedding": {"backend": w.config.embedding.backend, "model": "another-model", "dimensions": 16},
        "daemon": {"log_level": "debug"}})
    with structlog.testing.capture_logs() as logs:
        assert reload(worker, str(path)) is True
    cfg = w.manager.config
    assert (cfg.queue.min_batch_size, cfg.queue.flush_interval, cfg.queue.max_running_jobs) == (7, 2.0, 9)
    assert cfg.daemon.log_level == "debug"
    assert cfg.embedding.model == "test-model"  # needs a restart: kept
    assert worker.steps["flush"].interval == 2.0
    done = next(e for e in logs if e["event"] == "config.reloaded")
    assert set(done["applied"]) == {"queue.min_batch_size", "queue.flush_interval", "queue.max_running_jobs",
                                    "daemon.log_level"}
    restart = next(e for e in logs if e["event"] == "config.needs_restart")
    assert restart["keys"] == ["embedding.model"] and restart["log_level"] == "warning"

    path.write_text(path.read_text().replace('flush_interval = "2s"', 'flush_interval = "soon"'))
    with structlog.testing.capture_logs() as logs:
        assert reload(worker, str(path)) is False
    assert w.manager.config is cfg
    bad = next(e for e in logs if e["event"] == "config.reload_failed")
    assert bad["log_level"] == "error" and "queue.flush_interval" in bad["error"]


def test_sighup_reloads_the_running_daemon(tmp_path, batchd_env, notify, daemons):
    cfg = daemon_config(tmp_path, flush="1h", sync="0.5s")
    d = daemons(cfg, batchd_env, notify=notify)
    d.wait_event("daemon.ready")
    enqueue(cfg, batchd_env, texts("h", 5))  # the first flush tick is over: nothing flushes for an hour
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_event("config.reloaded", applied=[])
    assert counts(tmp_path / "app.db")["pending"] == 5

    cfg.write_text(cfg.read_text().replace('flush_interval = "1h"', 'flush_interval = "0.5s"'))
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_event("config.reloaded", applied=["queue.flush_interval"])
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 5, what="chunks flushed at the new interval")

    cfg.write_text(cfg.read_text().replace("dimensions = 16", "dimensions = 0"))
    os.kill(d.proc.pid, signal.SIGHUP)
    e = d.wait_event("config.reload_failed")
    assert "embedding.dimensions" in e["error"]
    cfg.write_text(cfg.read_text().replace("dimensions = 0", "dimensions = 16"))
    enqueue(cfg, batchd_env, texts("i", 3))  # still running, on the last good configuration
    wait_until(lambda: counts(tmp_path / "app.db")["ready"] == 8, what="work goes on after a bad reload")
    assert [m for _, m in notify.assignments("RELOADING")] == ["1", "1", "1"]
    assert len(notify.assignments("READY")) == 4  # start + one per reload

    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0


# ------------------------------------------------------------------------------------ the journal


def test_what_c_libraries_write_to_fd_1_and_2_becomes_json_events(tmp_path, batchd_env, daemons):
    cfg = daemon_config(tmp_path)
    set_knobs(tmp_path / "testbackend",
              foreign_output="Error in cpuinfo: failed to parse processor information from /proc/cpuinfo")
    d = daemons(cfg, batchd_env)
    d.wait_event("daemon.ready")
    enqueue(cfg, batchd_env, texts("j", 2))
    d.wait_event("foreign.output", stream="stderr")
    d.wait_event("foreign.output", stream="stdout")
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
    assert d.stderr == b""  # nothing reached the real stderr
    for line in d.lines:
        assert line.startswith("<"), line
        json.loads(line[3:])  # every line one JSON object
    foreign = [(line[:3], json.loads(line[3:])) for line in d.lines if '"foreign.output"' in line]
    prio, e = foreign[0]
    assert prio == "<4>" and e["level"] == "warning" and e["logger"] == "batchd.output"
    assert e["message"].endswith("Error in cpuinfo: failed to parse processor information from /proc/cpuinfo")


# ------------------------------------------------------------------------------------ files


def _run(env: dict[str, str], cfg: Path, *args: str, umask: int = 0o022, stdin: bytes | None = None,
         user: str | None = None) -> subprocess.CompletedProcess[str]:
    def pre() -> None:
        os.umask(umask)

    cmd = [*batchd_cmd(), "--config", str(cfg), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, preexec_fn=pre,
                          input=stdin.decode() if stdin else None)


def test_files_batchd_creates_are_never_readable_by_others(tmp_path, batchd_env):
    cfg = daemon_config(tmp_path)
    r = _run(batchd_env, cfg, "enqueue", stdin=b'{"text": "a private text"}\n')
    assert r.returncode == 0, r.stderr
    r = _run(batchd_env, cfg, "flush", "--force")
    assert r.returncode == 0, r.stderr
    db = tmp_path / "app.db"
    made = [db, Path(lock_path(str(db)))] + [p for p in (Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in made}
    assert all(m & 0o007 == 0 and m & 0o060 == 0o060 for m in modes.values()), modes


def test_an_unusable_lock_is_one_line_not_a_traceback(tmp_path, batchd_env):
    cfg = daemon_config(tmp_path)
    assert _run(batchd_env, cfg, "enqueue", stdin=b'{"text": "t"}\n').returncode == 0
    lock = lock_path(str(tmp_path / "app.db"))
    os.mkdir(lock)  # something batchd cannot open as its lock, even as root
    for cmd in ("flush", "sync"):
        r = _run(batchd_env, cfg, cmd)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith("batchd: ") and f"cannot open the worker lock {lock}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create files for another owner")
def test_files_root_creates_get_the_owner_and_group_of_the_database(tmp_path, batchd_env):
    import pwd

    nobody = pwd.getpwnam("nobody")
    folder = tmp_path / "state"
    folder.mkdir()
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    cfg = daemon_config(folder)
    r = _run(batchd_env, cfg, "enqueue", stdin=b'{"text": "t"}\n')  # root creates the database...
    assert r.returncode == 0, r.stderr
    assert _run(batchd_env, cfg, "flush", "--force").returncode == 0  # ...and the worker lock
    for name in ("app.db", Path(lock_path(str(folder / "app.db"))).name):
        st = (folder / name).stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), name


def test_check_reports_files_the_service_group_cannot_write(tmp_path, batchd_env):
    cfg = daemon_config(tmp_path)
    assert _run(batchd_env, cfg, "enqueue", stdin=b'{"text": "t"}\n').returncode == 0
    db = tmp_path / "app.db"
    r = _run(batchd_env, cfg, "check")
    assert "FAIL  file app.db" not in r.stdout, r.stdout
    in_home = any(Path(p).resolve().is_relative_to(h) for p in (sys.executable, sys.base_prefix)
                  for h in ("/root", "/home"))
    assert ("WARN  python: the Python interpreter lives in" in r.stdout) == in_home, r.stdout

    if os.geteuid() != 0:
        return  # the rest needs a file of another owner
    import pwd

    nobody = pwd.getpwnam("nobody")  # as an application with its own user and group and umask 022 would leave it
    os.chown(db, nobody.pw_uid, nobody.pw_gid)
    os.chmod(db, 0o644)
    r = _run(batchd_env, cfg, "check")
    assert r.returncode == 1
    line = next(x for x in r.stdout.splitlines() if x.startswith("FAIL  file app.db:"))
    assert "is not readable and writable by group" in line and "chmod 0660" in line


def test_until_idle_on_a_terminal_draws_a_progress_bar(tmp_path, batchd_env):
    cfg = daemon_config(tmp_path)
    enqueue(cfg, batchd_env, texts("bar", 120))
    set_knobs(tmp_path / "testbackend", result_delay=0.02)  # ~2.5 s of reading, progress every 50 lines
    code, text = on_a_terminal([*batchd_cmd(), "--config", str(cfg), "run", "--until-idle", "--poll", "0.2s"],
                               batchd_env, stderr_too=True, columns=120)  # a terminal has a size
    assert code == 0, text
    print(text)
    assert re.search(r"reading batch 1: +100%\|.*\| 120/120 \[", text), text  # tqdm's bar: count, time, rate
    assert "text/s" in text and "pending=0 running=0 ready=120 failed=0" in text
