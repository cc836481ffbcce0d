"""A seeded random loop of SIGKILLs of `batchd run` while the application edits rows (issue 9, fault suite).

Thirty times: start the daemon, let it work a random while (0.2-1.5 s: during start-up and recovery, a claim, an
upload, a create, a result download), SIGKILL it. Meanwhile a separate application process (stdlib sqlite3, no
sqlite-vec) updates, deletes, inserts, upserts and replaces rows without pause. Then the app stops, one clean
`batchd run --until-idle` finishes, and the invariants must hold: every chunk READY with the vector of its
current text, no vector for a deleted id, one remote job per batch, no text sent twice.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from batchd.config import load
from batchd.store import Store
from tests.configs import daemon_config
from tests.conftest import batchd_cmd
from tests.fakes.membackend import set_knobs
from tests.faults import appwriter
from tests.faults.invariants import problems, remote_jobs

SEED = int(os.environ.get("BATCHD_KILL_SEED", "20261130"))
KILLS = 30


def wait_for(log: Path, event: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while event not in log.read_text():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"no {event} within {timeout}s"
        time.sleep(0.02)


def _last_event(log: Path) -> str:
    import json

    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    try:
        return str(json.loads(lines[-1])["event"]) if lines else "(nothing logged yet)"
    except ValueError:
        return "(torn line)"


@pytest.mark.slow
def test_thirty_sigkills_while_the_app_edits(tmp_path: Path, batchd_env: dict[str, str]) -> None:
    rng = random.Random(SEED)
    cfg = daemon_config(tmp_path, flush="0.2s", sync="0.2s")
    cfg.write_text(cfg.read_text().replace("max_batch_size = 5000", "max_batch_size = 200"))
    db = tmp_path / "app.db"
    app = __import__("sqlite3").connect(db)
    app.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL)")
    app.executemany("INSERT INTO chunks(content) VALUES (?)", [(f"kill loop paragraph {i}",) for i in range(2000)])
    app.commit()
    app.close()
    # Jobs take a poll to finish and stream their lines slowly, so kills also land mid-download.
    set_knobs(tmp_path / "testbackend", shuffle=True, polls_to_finish=1, result_delay=0.0005)
    stop = tmp_path / "stop-editing"
    editor = subprocess.Popen([sys.executable, appwriter.__file__, str(db), "--edit-loop", str(SEED), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills = 0
    last_events: Counter[str] = Counter()
    try:
        for n in range(KILLS):
            log = tmp_path / f"run-{n}.log"
            with open(log, "w") as out:
                daemon = subprocess.Popen([*batchd_cmd(), "--config", str(cfg), "run"], env=batchd_env,
                                          stdout=out, stderr=subprocess.STDOUT)
            if rng.random() < 0.4:
                time.sleep(rng.uniform(0.1, 1.0))  # during start-up: opening, migrating, recovering
            else:
                wait_for(log, "daemon.ready", daemon)
                time.sleep(rng.uniform(0.0, 0.8))  # while flushing and syncing
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(timeout=30)
            kills += daemon.returncode == -signal.SIGKILL
            last_events[_last_event(log)] += 1
            assert editor.poll() is None, editor.stderr.read()
    finally:
        stop.touch()
        out, err = editor.communicate(timeout=60)
    assert editor.returncode == 0, err
    assert kills == KILLS
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "run", "--until-idle", "--poll", "0.1s"],
                       env=batchd_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    store = Store.open(load(str(cfg)))
    try:
        assert problems(store, tmp_path / "testbackend") == []
        batches = store.batches()
        jobs = remote_jobs(tmp_path / "testbackend", store.instance_id)
        print(f"seed {SEED}: {kills} kills, app edits {out.strip()}, {len(batches)} batches, {len(jobs)} jobs, "
              f"{store.queue_stats()}; last event before each kill: {dict(last_events)}")
    finally:
        store.close()
