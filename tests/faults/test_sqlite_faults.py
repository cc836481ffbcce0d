"""SQLite faults (issue 9 items 6, 9, 10): an application holding the write lock, damaged database files, a full
disk. Each is one clear line with a meaningful exit status, never a traceback; the daemon waits out a full disk.

The CLI is driven in-process through click's CliRunner (fast) except where a process boundary is the point
(the app's lock held by another process, the daemon). Disk-full and read-only cases mount a small tmpfs, which
needs root; elsewhere they are skipped with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchd.cli import main
from batchd.config import load
from batchd.daemon import Worker
from batchd.manager import BatchManager
from batchd.store import Store, explain
from tests.configs import daemon_config
from tests.conftest import MEMBACKEND, Clock, batchd_cmd
from tests.fakes.membackend import set_knobs
from tests.test_daemon import Daemon, NotifySocket, counts, wait_until


def write_cfg(folder: Path) -> Path:
    p = folder / "batchd.toml"
    p.write_text(f'[database]\npath = "{folder / "app.db"}"\n'
                 '[queue]\nmin_batch_size = 1\nmax_batch_size = 100\n'
                 f'[embedding]\nbackend = "{MEMBACKEND}"\nmodel = "test-model"\ndimensions = 16\n')
    return p


@pytest.fixture(autouse=True)
def _restore_logging():
    """CliRunner points batchd's log handler at its own captured stream; point it back afterwards."""
    yield
    from batchd import logs

    logs.configure("warning", stream=sys.stderr)


def cli(cfg: Path, *args: str, stdin: bytes | None = None) -> Any:
    """One in-process CLI run. Asserts the property every fault shares: no traceback, at most one error line."""
    r = CliRunner().invoke(main, ["--config", str(cfg), *args], input=stdin)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [line for line in r.stderr.splitlines() if line.startswith("batchd:")]
    assert "Traceback" not in r.stdout + r.stderr
    assert len(errors) <= 1, r.stderr
    return r


def seed(cfg: Path, n: int = 300, flush: bool = True) -> None:
    """n chunks (several pages), optionally in RUNNING batches the test backend will answer."""
    data = b"".join(json.dumps({"text": f"chunk {i} " + "lorem ipsum " * 20}).encode() + b"\n" for i in range(n))
    assert cli(cfg, "enqueue", "-", stdin=data).exit_code == 0
    if flush:
        assert cli(cfg, "flush", "--force").exit_code == 0


# ------------------------------------------------------------------------------------------ item 6: busy

HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE chunks SET content = content WHERE id = 1")
print("held", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


@contextlib.contextmanager
def app_holds_write_lock(db: Path) -> Iterator[subprocess.Popen]:
    """Another process (the application, plain stdlib sqlite3) in BEGIN IMMEDIATE until the block ends."""
    app = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(db)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout.readline().strip() == "held"
        yield app
    finally:
        app.stdin.close()
        app.wait(timeout=30)


def test_reads_never_wait_for_the_applications_write_lock(tmp_path: Path) -> None:
    """stats and jobs used to wait the whole busy timeout (10 s) in close(), for PRAGMA optimize."""
    cfg = write_cfg(tmp_path)
    seed(cfg, n=20)
    with app_holds_write_lock(tmp_path / "app.db") as app:
        started = time.monotonic()
        store = Store.open(load(cfg))
        stats = store.queue_stats()
        batches = store.batches(limit=5)
        store.close()
        took = time.monotonic() - started
        r = cli(cfg, "stats", "--json")
        assert app.poll() is None  # the lock was held all along
    assert stats["running"] == 20 and len(batches) == 1
    assert took < 5.0, f"a read-only session took {took:.1f}s under the app's lock (busy timeout is 10s)"
    assert r.exit_code == 0 and json.loads(r.stdout)["running"] == 20


def test_writes_under_the_applications_lock_exit_75_with_one_line(tmp_path: Path, batchd_env: dict[str, str],
                                                                  clock: Clock):
    """enqueue, retry and cancel used to crash with an OperationalError traceback after the busy timeout. In the
    daemon (stepped in-process, at the same time) a busy database is not a failure: no backoff, no traceback."""
    from batchd.backends import make_backend

    cfg = write_cfg(tmp_path)
    set_knobs(tmp_path / "testbackend", never_finish=True)
    seed(cfg, n=20)
    config = load(cfg)
    store = Store.open(config)
    manager = BatchManager(store, make_backend(config, store.instance_id), config, clock=clock)
    manager.enqueue(iter([(None, "a"), (None, "b")]))
    worker = Worker(manager, clock=clock)
    commands = {"enqueue": ["enqueue", "-"], "retry": ["retry"], "cancel": ["cancel", "1"]}
    try:
        with app_holds_write_lock(tmp_path / "app.db"):
            procs = {name: subprocess.Popen([*batchd_cmd(), "--config", str(cfg), *args], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env=batchd_env)
                     for name, args in commands.items()}
            for p in procs.values():
                p.stdin.write('{"text": "while locked"}\n')
                p.stdin.close()
            step = worker.flush(force=True)  # waits out the busy timeout alongside the three commands
            outs = {name: (p.stdout.read(), p.stderr.read(), p.wait(timeout=120)) for name, p in procs.items()}
        assert step.skipped and not step.ok
        assert worker.steps["flush"].consecutive == 0  # no backoff
        step = worker.flush(force=True)
        assert step.ok and len(step.value.submitted) == 1
    finally:
        store.close()
    for name, (out, err, code) in outs.items():
        assert code == 75, (name, out, err)
        assert "Traceback" not in err and "process.crashed" not in err, (name, err)
        lines = [line for line in err.splitlines() if line.startswith("batchd:")]
        if name == "cancel" and len(lines) == 1 and "another batchd process" in lines[0]:
            continue  # the in-process worker below holds the worker lock while it waits: cancel refuses (75) first
        assert lines == [f"batchd: database error: {tmp_path / 'app.db'}: database is busy: another connection "
                         "(the application?) has held its write lock for more than 10s; nothing more was written, "
                         "try again"], (name, err)
    # Lock released: the same commands now work.
    assert cli(cfg, "enqueue", "-", stdin=b'{"text": "after"}\n').exit_code == 0
    assert cli(cfg, "cancel", "1").exit_code == 0


def test_enqueue_cut_short_says_how_far_it_got(tmp_path: Path) -> None:
    """Slices are transactions: when the second one cannot be written, the line says the first one landed (lines
    without an id must not be queued twice by a retry of the whole file)."""
    import threading

    from batchd.store import ENQUEUE_SLICE, _sqlite_module

    cfg = write_cfg(tmp_path)
    db = tmp_path / "app.db"
    assert cli(cfg, "enqueue", "-", stdin=b'{"id": 1, "text": "first"}\n').exit_code == 0
    fifo = tmp_path / "lines.jsonl"
    os.mkfifo(fifo)
    holder: list[Any] = []

    def feed() -> None:
        with open(fifo, "w") as f:
            f.writelines(json.dumps({"text": f"line {i}"}) + "\n" for i in range(ENQUEUE_SLICE))
            f.flush()
            # The same SQLite library as batchd in this process (see Store.sqlite_module): closing a stdlib
            # connection would drop the locks batchd's own connection holds on the file.
            conn = _sqlite_module().connect(db)
            wait_until(lambda: conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == ENQUEUE_SLICE + 1,
                       timeout=120, what="the first slice committed")
            conn.close()
            holder.append(app_holds_write_lock(db))
            holder[0].__enter__()
            f.write('{"text": "in the second slice"}\n')

    t = threading.Thread(target=feed)
    t.start()
    try:
        r = cli(cfg, "enqueue", str(fifo))
    finally:
        t.join(timeout=180)
        if holder:
            holder[0].__exit__(None, None, None)
    assert r.exit_code == 75, (r.stdout, r.stderr)
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("batchd:")]
    assert line.endswith(f"try again (the first {ENQUEUE_SLICE:,} good lines were queued; the rest were not)"), line


# ------------------------------------------------------------------------------------------ item 9: damage


def _root_pages(db: Path) -> list[int]:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE rootpage > 1 "
            "AND name NOT IN ('batchd_meta', 'batch_jobs') AND tbl_name NOT IN ('batchd_meta', 'batch_jobs')")]
    finally:
        conn.close()


def corrupt_btrees(db: Path) -> None:
    """Scribble over the root page of every b-tree of the chunks and vectors (not batchd_meta/batch_jobs)."""
    pages = _root_pages(db)
    size = 4096
    with open(db, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(b"\xa5" * size)


def truncate(db: Path) -> None:
    os.truncate(db, os.path.getsize(db) // 3)


def not_sqlite(db: Path) -> None:
    db.write_text("this is a CSV export, not a database\n" * 200)


@pytest.mark.parametrize("damage", [corrupt_btrees, truncate, not_sqlite])
def test_damaged_files_are_one_line_and_non_zero(tmp_path: Path, damage: Any) -> None:
    cfg = write_cfg(tmp_path)
    seed(cfg)
    db = tmp_path / "app.db"
    damage(db)
    for command in (["stats"], ["flush", "--force"], ["sync"], ["search", "lorem"], ["jobs"]):
        r = cli(cfg, *command)
        if command == ["jobs"] and r.exit_code == 0:
            continue  # batch_jobs may well be intact
        assert r.exit_code == 1, (command, r.stdout, r.stderr)
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("batchd:")]
        assert line.startswith(f"batchd: database error: {db}: "), line
        assert "damaged" in line or "not an SQLite database" in line, line
    r = cli(cfg, "check")
    assert r.exit_code == 1
    said = r.stdout + r.stderr
    assert ("FAIL  database integrity (integrity_check): " in said) or "damaged" in said \
        or "not an SQLite database" in said, said


def test_check_runs_an_integrity_check(tmp_path: Path) -> None:
    """check used to say everything was ok on a file with damaged b-trees."""
    cfg = write_cfg(tmp_path)
    seed(cfg)
    r = cli(cfg, "check")
    assert "ok    database integrity (integrity_check): no problems found" in r.stdout.splitlines()
    corrupt_btrees(tmp_path / "app.db")
    r = cli(cfg, "check")
    assert r.exit_code == 1
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("FAIL  database integrity")]
    assert line.startswith("FAIL  database integrity (integrity_check): ") and "problem(s), first: " in line
    assert "***" not in line  # the header SQLite puts before a database's problems is not one of them
    # quick_check for big files
    store = Store.open(load(cfg))
    try:
        how, found = store.integrity(full_below_bytes=1)
        assert how == "quick_check" and found
    finally:
        store.close()


# ------------------------------------------------------------------------------------ tmpfs: read-only, full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (root only; skipped with a message otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full and read-only cases needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte; return the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * block)
    finally:
        os.close(fd)
    return filler


def test_read_only_database_is_one_line(small_disk: Path) -> None:
    cfg = write_cfg(small_disk)
    seed(cfg, n=20)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for command in (["stats"], ["flush", "--force"], ["sync"], ["search", "lorem"], ["check"]):
        r = cli(cfg, *command)
        assert r.exit_code == 1, (command, r.stdout, r.stderr)
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("batchd:")]
        assert line.startswith(f"batchd: database error: {small_disk / 'app.db'}: the database is read-only"), line


def test_disk_full_is_said_and_exits_75(small_disk: Path) -> None:
    """Under a full disk every command used to say "disk I/O error"."""
    cfg = write_cfg(small_disk)
    seed(cfg, n=20, flush=False)
    filler = fill(small_disk)
    for command, stdin in ((["enqueue", "-"], b'{"text": "one more"}\n'), (["flush", "--force"], None),
                           (["retry"], None)):
        r = cli(cfg, *command, stdin=stdin)
        assert r.exit_code == 75, (command, r.stdout, r.stderr)
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("batchd:")]
        assert line.startswith(f"batchd: database error: {small_disk / 'app.db'}: disk full: no space left"), line
    filler.unlink()
    assert cli(cfg, "enqueue", "-", stdin=b'{"text": "one more"}\n').exit_code == 0


def test_worker_step_on_a_full_disk_backs_off_and_recovers(small_disk: Path, clock: Clock) -> None:
    """In the daemon's wrapper: the failure reads "disk full" (STATUS=), is retried with backoff, and clears."""
    from batchd.backends import make_backend

    cfg = load(write_cfg(small_disk))
    store = Store.open(cfg)
    try:
        manager = BatchManager(store, make_backend(cfg, store.instance_id), cfg, clock=clock)
        manager.enqueue(iter([(None, f"text {i}") for i in range(20)]))
        worker = Worker(manager, clock=clock)
        filler = fill(small_disk)
        out = worker.flush(force=True)
        assert not out.ok
        line = worker.status_line({"pending": 20, "running": 0, "ready": 0, "failed": 0})
        assert "flush failing (1x): disk full: no space left" in line, line
        clock.advance(1)
        worker.flush(force=True)
        assert worker.steps["flush"].consecutive == 2 and worker.steps["flush"].retry_at > clock.now
        filler.unlink()
        clock.advance(3600)
        out = worker.flush(force=True)
        assert out.ok and out.value.submitted, out
        assert worker.steps["flush"].consecutive == 0
    finally:
        store.close()


def test_daemon_waits_out_a_full_disk_then_embeds(small_disk: Path, batchd_env: dict[str, str],
                                                 tmp_path: Path) -> None:
    """The daemon used to exit 1 at start-up on a full disk (systemd gave up after 5 restarts). Now it stays up,
    says "disk full" in STATUS=, and embeds everything once space is freed."""
    cfg = daemon_config(small_disk)
    db = small_disk / "app.db"
    data = "".join(json.dumps({"text": f"queued before the disk filled {i}"}) + "\n" for i in range(30))
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "enqueue"], input=data, text=True, env=batchd_env,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    filler = fill(small_disk)
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = Daemon(cfg, batchd_env, notify=notify)
    try:
        wait_until(lambda: [s for _, s in notify.assignments("STATUS") if "disk full" in s], timeout=60,
                   what="STATUS= saying disk full")
        daemon.wait_event("daemon.database_unavailable", timeout=60, attempt=2)
        assert daemon.proc.poll() is None, daemon.tail()
        assert notify.assignments("READY")  # so systemd's start timeout does not kill it while it waits
        # READY=1 allows `systemctl reload`: SIGHUP while waiting must not end it (SIGHUP's default action).
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_event("daemon.database_unavailable", timeout=60, attempt=3)
        assert daemon.proc.poll() is None, daemon.tail()
        filler.unlink()
        wait_until(lambda: counts(db)["ready"] == 30, timeout=120, what="every chunk READY after space was freed")
        daemon.wait_event("config.reloaded", timeout=30)  # the reload asked for while waiting, applied once up
        daemon.proc.terminate()
        assert daemon.finish(timeout=60) == 0
        event = daemon.wait_event("daemon.database_unavailable")
        assert "disk full" in event["error"]
    finally:
        daemon.kill()
        notify.close()


def test_explain_recognises_enospc_and_leaves_other_errors_alone(tmp_path: Path) -> None:
    import errno

    assert "disk full" in str(explain(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path / "x.db")))
    assert explain(ValueError("a bug"), str(tmp_path / "x.db")) is None
