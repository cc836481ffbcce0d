"""Crash at every dangerous instant (batchd/faults.py names them), then restart: no chunk lost, no stale vector,
exactly one remote job per batch, no text paid twice.

`batchd run --once` is killed with SIGKILL by the crash point itself (``BATCHD_CRASH_AT``), at a precise and
repeatable instant; then `batchd run --until-idle` without the variable must finish the work.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batchd.config import load
from batchd.faults import POINTS
from batchd.store import Store
from tests.configs import daemon_config
from tests.conftest import batchd_cmd
from tests.fakes.membackend import set_knobs
from tests.faults.invariants import problems, remote_jobs

SLICE_CHUNKS = 2_100  # more than one RESULT_SLICE (2,000), so a crash can fall between two slices


def batchd(env: dict[str, str], cfg: Path, *args: str, crash_at: str | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(env)
    env.pop("BATCHD_CRASH_AT", None)
    if crash_at:
        env["BATCHD_CRASH_AT"] = crash_at
    return subprocess.run([*batchd_cmd(), "--config", str(cfg), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def crashed(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode == -signal.SIGKILL


@pytest.fixture
def setup(tmp_path: Path, batchd_env: dict[str, str]) -> Any:
    """The application's table, filled by the application itself (stdlib sqlite3) before batchd ever ran."""
    import sqlite3

    cfg = daemon_config(tmp_path, flush="0.2s", sync="0.2s")
    app = sqlite3.connect(tmp_path / "app.db")
    app.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL)")
    app.executemany("INSERT INTO chunks(content) VALUES (?)", [(f"crash test paragraph {i}",) for i in range(SLICE_CHUNKS)])
    app.commit()
    app.close()
    return cfg


def finish_and_check(env: dict[str, str], cfg: Path, tmp_path: Path) -> Store:
    r = batchd(env, cfg, "run", "--until-idle", "--poll", "0.1s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    store = Store.open(load(str(cfg)))
    assert problems(store, tmp_path / "testbackend") == []
    assert store.queue_stats()["ready"] == SLICE_CHUNKS
    return store


CHAIN = ("claim.committed", "submit.uploaded", "submit.created", "recover.found", "results.slice_applied")


def test_a_crash_at_every_point_in_turn_then_a_restart_finishes_the_work(setup: Path, batchd_env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """One database, killed at each point in turn — every restart picks up where the last one died:
    claimed but unsent → the recovery's upload → its create (name unsaved) → the recovery that finds that job →
    between two result slices. The invariants hold after every crash, and a last clean run finishes the work
    with one remote job for the one batch."""
    assert set(CHAIN) == set(POINTS)
    cfg = setup
    for point in CHAIN:
        r = batchd(batchd_env, cfg, "run", "--once", crash_at=point)
        assert crashed(r), f"{point}: exit {r.returncode}\n{r.stdout[-1500:]}{r.stderr[-1500:]}"
        store = Store.open(load(str(cfg)))
        assert problems(store, tmp_path / "testbackend", idle=False) == [], point
        store.close()
    store = finish_and_check(batchd_env, cfg, tmp_path)
    assert len(remote_jobs(tmp_path / "testbackend", store.instance_id)) == len(store.batches()) == 1
    store.close()


def test_a_crash_between_result_slices_while_the_app_rewrites_texts(setup: Path, batchd_env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """Half the results applied, then a crash; the app rewrites texts of both halves before the restart. The
    restart applies the rest, drops the stale results, and embeds the new texts: nothing stale remains."""
    import sqlite3

    cfg = setup
    set_knobs(tmp_path / "testbackend", shuffle=True)
    assert crashed(batchd(batchd_env, cfg, "run", "--once", crash_at="results.slice_applied"))
    app = sqlite3.connect(tmp_path / "app.db")
    app.execute("UPDATE chunks SET content = content || ' (edited)' WHERE id % 7 = 0")
    app.execute("DELETE FROM chunks WHERE id % 11 = 0")
    app.commit()
    app.close()
    r = batchd(batchd_env, cfg, "run", "--until-idle", "--poll", "0.1s")
    assert r.returncode == 0, r.stderr[-2000:]
    store = Store.open(load(str(cfg)))
    assert problems(store, tmp_path / "testbackend") == []
    store.close()
