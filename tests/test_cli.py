"""The `batchd` command on real files, in this process through click's CliRunner (tests.conftest.cli): output,
stderr and exit status exactly as the console script gives them. test_console_script runs the real script once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MEMBACKEND, REPO, batchd_cmd, cli


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "batchd.toml"
    p.write_text(
        f'[database]\npath = "{tmp_path / "app.db"}"\n'
        '[queue]\nmin_batch_size = 1\nmax_batch_size = 4\nmax_attempts = 2\n'
        f'[embedding]\nbackend = "{MEMBACKEND}"\nmodel = "test-model"\ndimensions = 8\n'
    )
    return p


def run(env, cfg, *args, stdin=None):
    return cli("--config", str(cfg), *args, input=stdin, env=env)


def test_console_script(cfg, batchd_env):
    """The installed `batchd` script reaches the same code (everything else here runs in-process)."""
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "enqueue", "/dev/null"], capture_output=True,
                       text=True, env=batchd_env, timeout=120)
    assert r.returncode == 0, r.stderr  # enqueue creates the database; stats never does
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "stats", "--json"], capture_output=True, text=True,
                       env=batchd_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pending"] == 0


def test_enqueue_reports_bad_lines_by_number_and_keeps_the_good(cfg, batchd_env, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join([
        '{"id": 1, "text": "first"}',
        'not json',
        '{"text": "second"}',
        '{"id": 3}',
        '{"id": 4, "text": 12}',
        '',
        '{"id": 5, "text": "   "}',
        '[1, 2]',
        '{"id": "six", "text": "x"}',
        '{"text": "third"}',
    ]) + "\n")
    r = run(batchd_env, cfg, "enqueue", str(data))
    assert r.returncode == 1
    assert r.stdout.strip() == "inserted=3 requeued=0 unchanged=0 rejected=6"
    errs = r.stderr.strip().splitlines()
    assert errs[0].startswith(f"batchd: enqueue: {data}:2: not valid JSON (") and errs[0].endswith("; line skipped")
    assert errs[1:] == [
        f'batchd: enqueue: {data}:4: no "text" field; line skipped',
        f'batchd: enqueue: {data}:5: "text" is not a string; line skipped',
        f'batchd: enqueue: {data}:7: "text" is empty; line skipped',
        f"batchd: enqueue: {data}:8: not a JSON object; line skipped",
        f'batchd: enqueue: {data}:9: "id" is not an integer; line skipped',
    ]
    # From stdin, ids re-queue on change and are left alone when unchanged.
    r = run(batchd_env, cfg, "enqueue", stdin='{"id": 1, "text": "first"}\n{"id": 100, "text": "new"}\n')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "inserted=1 requeued=0 unchanged=1 rejected=0"


def test_enqueue_skips_the_lines_the_applications_table_refuses_and_names_them(cfg, batchd_env, tmp_path):
    """A CHECK constraint or a trigger's RAISE on the app's own table used to fail the whole 10,000-line slice
    with "database error ... run `batchd check`" and no line number. Now each refused line is named and skipped,
    like a malformed one, and every other line of its slice is queued."""
    import sqlite3

    from batchd.store import ENQUEUE_SLICE

    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL CHECK (length(content) < 40))")
    conn.execute("CREATE TRIGGER no_secrets BEFORE INSERT ON chunks WHEN NEW.content LIKE '%secret%' "
                 "BEGIN SELECT RAISE(ABORT, 'no secrets here'); END")
    conn.execute("INSERT INTO chunks(id, content) VALUES (7, 'seven')")
    conn.commit()
    conn.close()
    lines = [json.dumps({"text": f"line {i}"}) for i in range(ENQUEUE_SLICE + 10)]
    lines[3] = json.dumps({"text": "x" * 50})  # first slice
    lines[ENQUEUE_SLICE + 4] = json.dumps({"text": "a secret"})  # second slice: line numbers must still be right
    lines[ENQUEUE_SLICE + 6] = json.dumps({"id": 7, "text": "y" * 60})  # an update refused: the row keeps its text
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(lines) + "\n")
    r = run(batchd_env, cfg, "enqueue", str(data))
    assert r.returncode == 1
    assert r.stdout.strip() == f"inserted={ENQUEUE_SLICE + 7} requeued=0 unchanged=0 rejected=3"
    assert r.stderr.strip().splitlines() == [
        f"batchd: enqueue: {data}:4: the table chunks refused it (IntegrityError: CHECK constraint failed: "
        "length(content) < 40); line skipped",
        f"batchd: enqueue: {data}:{ENQUEUE_SLICE + 5}: the table chunks refused it (IntegrityError: no secrets "
        "here); line skipped",
        f"batchd: enqueue: {data}:{ENQUEUE_SLICE + 7}: the table chunks refused it (IntegrityError: CHECK "
        "constraint failed: length(content) < 40); line skipped",
    ]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == ENQUEUE_SLICE + 8
        assert conn.execute("SELECT content FROM chunks WHERE id = 7").fetchone()[0] == "seven"
        assert conn.execute("SELECT count(*) FROM chunks WHERE content = 'line 9'").fetchone()[0] == 1
    finally:
        conn.close()


def test_enqueue_into_a_table_that_refuses_every_line_is_one_line(cfg, batchd_env, tmp_path):
    """A table with a NOT NULL column batchd does not fill refuses everything: one line naming the cause, not a
    "line skipped" per line."""
    import sqlite3

    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL, doc_id INTEGER NOT NULL)")
    conn.commit()
    conn.close()
    r = run(batchd_env, cfg, "enqueue", stdin="".join(json.dumps({"text": f"t {i}"}) + "\n" for i in range(50)))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == ("batchd: enqueue: -: the table chunks refused every line of a slice of 50 "
                                "(IntegrityError: NOT NULL constraint failed: chunks.doc_id); nothing was queued")


def test_flush_sync_stats_jobs_retry_cancel(cfg, batchd_env, tmp_path):
    texts = "".join(json.dumps({"text": f"chunk {i}"}) + "\n" for i in range(10))
    assert run(batchd_env, cfg, "enqueue", stdin=texts).returncode == 0
    r = run(batchd_env, cfg, "stats", "--json")
    assert json.loads(r.stdout) == {"pending": 10, "running": 0, "ready": 0, "failed": 0, "truncated": 0,
                                    "batches": {"PENDING": 0, "RUNNING": 0, "COMPLETED": 0, "FAILED": 0}}
    r = run(batchd_env, cfg, "flush")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "submitted 3 batch(es): 1, 2, 3"
    # Logs go to stderr as JSON (not a terminal); stdout stays the command's output.
    events = [json.loads(line)["event"] for line in r.stderr.splitlines()]
    assert events.count("batch.submitted") == 3
    r = run(batchd_env, cfg, "sync")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "checked=3 finished=3 applied=10 retried=0 failed=0"
    st = json.loads(run(batchd_env, cfg, "stats", "--json").stdout)
    assert st["ready"] == 10 and st["batches"]["COMPLETED"] == 3
    r = run(batchd_env, cfg, "stats")
    assert "ready            10" in r.stdout
    jobs = [json.loads(line) for line in run(batchd_env, cfg, "jobs", "--json", "--limit", "2").stdout.splitlines()]
    assert [j["id"] for j in jobs] == [3, 2] and all(j["status"] == "COMPLETED" for j in jobs)
    table = run(batchd_env, cfg, "jobs").stdout
    assert "COMPLETED" in table and "SUCCEEDED" in table

    # A job that fails twice: chunks FAILED (max_attempts 2); retry --failed puts them back.
    (tmp_path / "testbackend" / "knobs.json").write_text('{"final_state": "FAILED"}')
    run(batchd_env, cfg, "enqueue", stdin='{"text": "doomed"}\n')
    for _ in range(2):
        run(batchd_env, cfg, "flush", "--force")
        run(batchd_env, cfg, "sync")
    st = json.loads(run(batchd_env, cfg, "stats", "--json").stdout)
    assert st["failed"] == 1
    # Plain `stats` says why chunks failed, grouped by reason.
    assert "         1 x job FAILED: simulated failed job" in run(batchd_env, cfg, "stats").stdout.splitlines()
    r = run(batchd_env, cfg, "retry", "--failed")
    assert r.stdout.strip() == "requeued 1 failed chunk(s)"
    (tmp_path / "testbackend" / "knobs.json").write_text('{"never_finish": true}')
    run(batchd_env, cfg, "flush", "--force")
    batch = json.loads(run(batchd_env, cfg, "jobs", "--json", "--limit", "1").stdout)["id"]
    r = run(batchd_env, cfg, "cancel", str(batch))
    assert r.returncode == 0 and r.stdout.strip() == f"cancelled batch {batch}"
    r = run(batchd_env, cfg, "cancel", str(batch))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"batchd: cancel: batch {batch} does not exist or is already finished"
    assert json.loads(run(batchd_env, cfg, "stats", "--json").stdout)["pending"] == 1


def test_check_on_the_shipped_config_says_what_vertex_lacks(tmp_path, batchd_env):
    """`batchd check` on a copy of etc/batchd.toml with a database path in an existing folder: config valid,
    the missing database said (and not created), what the first run will create, and what the Vertex backend
    still lacks, as clear lines (no traceback)."""
    text = (REPO / "etc" / "batchd.toml").read_text()
    text = text.replace('path = "/var/lib/batchd/batchd.db"', f'path = "{tmp_path / "state" / "batchd.db"}"')
    p = tmp_path / "batchd.toml"
    p.write_text(text)
    (tmp_path / "state").mkdir()
    r = run(batchd_env, p, "check")
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"ok    config {p}"
    assert lines[1] == f"FAIL  database {tmp_path / 'state' / 'batchd.db'} does not exist (check database.path; " \
        "`batchd enqueue` or `batchd run` creates it)"
    assert lines[2].startswith("plan  the first `batchd run` or `batchd enqueue` will (")
    assert "plan    create vec table chunks_vec (vec0, float[768], cosine distance)" in lines
    assert "FAIL  vertex: vertex.project is not set" in r.stdout
    assert "FAIL  vertex: vertex.staging_uri is not set" in r.stdout
    assert list((tmp_path / "state").iterdir()) == []


def test_database_errors_are_one_line(tmp_path, batchd_env, cfg):
    assert run(batchd_env, cfg, "enqueue", stdin='{"text": "a"}\n').returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("dimensions = 8", "dimensions = 16"))
    r = run(batchd_env, bad, "stats")
    assert r.returncode == 78
    assert r.stderr.strip() == (f"batchd: config error: {bad}: embedding.dimensions: chunks_vec holds 8-dimension "
                                "vectors but embedding.dimensions is 16: set embedding.dimensions = 8 again, or run "
                                "`batchd reset-vectors --yes` to drop every vector and embed all chunks again at 16")


HOLD_LOCK = """
import sys, time
from batchd.config import load
from batchd.store import Store
store = Store.open(load(sys.argv[1]))
with store.worker_lock():
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_one_worker_at_a_time_per_database(cfg, batchd_env):
    """While another batchd process flushes or syncs, a second one refuses (75) instead of racing it:
    two recoveries of the same unsubmitted batch could otherwise submit it twice."""
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cfg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=batchd_env)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in ("flush", "sync"):
            r = run(batchd_env, cfg, command)
            assert r.returncode == 75, r.stderr
            assert r.stderr.strip() == (f"batchd: {command}: another batchd process (pid {holder.pid}) is flushing "
                                        f"or syncing {cfg.parent / 'app.db'}; try again when it is done")
        assert run(batchd_env, cfg, "stats").returncode == 0  # readers are never blocked
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert run(batchd_env, cfg, "sync").returncode == 0


def test_retry_goes_through_the_manager_and_takes_its_old_flag(cfg, batchd_env, tmp_path):
    (tmp_path / "testbackend").mkdir()
    (tmp_path / "testbackend" / "knobs.json").write_text('{"final_state": "FAILED"}')
    run(batchd_env, cfg, "enqueue", stdin='{"text": "doomed"}\n')
    for _ in range(2):
        run(batchd_env, cfg, "flush", "--force")
        run(batchd_env, cfg, "sync")
    r = run(batchd_env, cfg, "retry")
    assert (r.returncode, r.stdout.strip()) == (0, "requeued 1 failed chunk(s)")
    events = [json.loads(line) for line in r.stderr.splitlines()]
    assert [(e["event"], e["chunks"]) for e in events if e["event"] == "chunks.retried"] == [("chunks.retried", 1)]
    r = run(batchd_env, cfg, "retry", "--failed")  # scripts written for 0.1 still run
    assert (r.returncode, r.stdout.strip()) == (0, "requeued 0 failed chunk(s)")
    assert "--failed" not in run(batchd_env, cfg, "retry", "--help").stdout


def test_flush_names_each_batch_it_could_not_submit_and_exits_1(cfg, batchd_env, tmp_path):
    (tmp_path / "testbackend").mkdir()
    (tmp_path / "testbackend" / "knobs.json").write_text('{"submit_permanent": "400 model not allowed"}')
    run(batchd_env, cfg, "enqueue", stdin="".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(6)))
    r = run(batchd_env, cfg, "flush")
    assert r.returncode == 1
    assert r.stdout.strip() == "submitted 0 batch(es): 1"
    assert [line for line in r.stderr.splitlines() if line.startswith("batchd:")] == [
        "batchd: flush: batch 1 not submitted (FAILED): submit rejected: 400 model not allowed"]
    (tmp_path / "testbackend" / "knobs.json").write_text('{"submit_errors": 1}')
    r = run(batchd_env, cfg, "flush")
    assert r.returncode == 1 and r.stdout.strip() == "submitted 0 batch(es): 2"
    assert "batchd: flush: batch 2 not submitted (PENDING): submit failed, will retry: 503 simulated: " \
           "service unavailable" in r.stderr
    r = run(batchd_env, cfg, "flush")  # recover() submits batch 2; 2 chunks are left for batch 3
    assert (r.returncode, r.stdout.strip()) == (0, "submitted 1 batch(es): 3")


def test_run_once_in_process_exits_1_while_a_batch_waits_to_be_submitted(cfg, batchd_env, tmp_path):
    (tmp_path / "testbackend").mkdir()
    (tmp_path / "testbackend" / "knobs.json").write_text('{"submit_errors": 1}')
    run(batchd_env, cfg, "enqueue", stdin='{"text": "a"}\n{"text": "b"}\n')
    r = run(batchd_env, cfg, "run", "--once")
    assert r.returncode == 1
    [done] = [json.loads(line) for line in r.stdout.splitlines() if '"daemon.once_done"' in line]
    assert done["failed_steps"] == ["submit"] and done["unsubmitted_batches"] == [1]
    r = run(batchd_env, cfg, "run", "--once")
    assert r.returncode == 0, r.stdout
    assert json.loads(run(batchd_env, cfg, "stats", "--json").stdout)["ready"] == 2


def test_usage_errors_exit_2(cfg, batchd_env):
    r = run(batchd_env, cfg, "run", "--once", "--until-idle")
    assert r.returncode == 2 and "--once and --until-idle cannot be combined" in r.stderr
    assert run(batchd_env, cfg, "run", "--until-idle", "--poll", "soon").returncode == 2
    assert run(batchd_env, cfg, "jobs", "--limit", "0").returncode == 2
