"""At most one process works on a database however it is named, and operator commands never race a step into
paying twice (issue 9, items 2 and 5).

The "operator" is a second Store + BatchManager on the same file: its own connection and its own lock descriptor,
exactly what a hand-run `batchd cancel` has. It acts from inside the worker's ``progress`` hook, i.e. at a
precise instant in the middle of the worker's submit or result download — deterministic, no sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchd.store import Busy, Store
from tests.fakes.membackend import read_counters
from tests.faults.invariants import problems


def texts(n: int, tag: str = "t") -> list[tuple[None, str]]:
    return [(None, f"{tag} text number {i}") for i in range(n)]


# ------------------------------------------------------------------------------- item 2: the lock


TRY_LOCK = """
import sys
from batchd.config import load
from batchd.store import Busy, Store
store = Store.open(load(sys.argv[1]))
try:
    with store.worker_lock():
        print("free")
except Busy:
    print("busy")
"""


def try_lock_elsewhere(db_path: str, tmp_path: Path, env: dict[str, str]) -> str:
    """Another process, configured with ``db_path``, tries to take the worker lock: "busy" or "free"."""
    import subprocess
    import sys

    from tests.conftest import MEMBACKEND

    cfg = tmp_path / "other.toml"
    cfg.write_text(f'[database]\npath = "{db_path}"\n[embedding]\nbackend = "{MEMBACKEND}"\n'
                   'model = "test-model"\ndimensions = 16\n')
    r = subprocess.run([sys.executable, "-c", TRY_LOCK, str(cfg)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("how", ["symlink", "hardlink", "relative"])
def test_worker_lock_is_keyed_on_the_database_not_its_path(make_config: Any, tmp_path: Path, how: str,
                                                           batchd_env: dict[str, str]) -> None:
    """Two configs reaching one database file by different names: while one process holds the worker lock, the
    other is refused (was: each name had its own lock, and both recovered the same batch)."""
    store = Store.open(make_config())
    real = Path(store.config.database.path)
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    if how == "symlink":
        alias = str(other_dir / "link.db")
        os.symlink(real, alias)
    elif how == "hardlink":  # a second name in the same folder (SQLite's own WAL files go by the name's folder)
        alias = str(tmp_path / "same-file.db")
        os.link(real, alias)
    else:
        alias = os.path.relpath(real, tmp_path)  # resolved against the other process's working folder
    try:
        with store.worker_lock():
            assert try_lock_elsewhere(alias, tmp_path, batchd_env) == "busy"
        assert try_lock_elsewhere(alias, tmp_path, batchd_env) == "free"
    finally:
        store.close()


def test_two_names_never_both_recover_an_interrupted_batch(world: Any, tmp_path: Path) -> None:
    """The defect as found: a batch left PENDING without a job name, and two workers reaching the database through
    a symlink. The second one to start its step must refuse (Busy), so the batch gets exactly one remote job."""
    w = world()
    w.manager.enqueue(texts(30))
    w.manager.prepare()
    w.store.claim_batch(1000, "test-model", w.clock())  # committed, then "crashed" before the submit
    link = tmp_path / "link-dir"
    link.mkdir()
    os.symlink(w.config.database.path, link / "app.db")
    other = world(database={"path": str(link / "app.db")})
    refused: list[BaseException] = []

    def in_submit() -> None:
        try:
            other.manager.recover()
        except Busy as e:
            refused.append(e)

    w.manager.progress = in_submit
    assert w.manager.recover() == 1
    assert len(refused) >= 1
    assert read_counters(w.dir)["creates"] == 1
    assert problems(w.store, w.dir, idle=False) == []


# ------------------------------------------------------------------------------- item 5: cancel vs a step


def test_cancel_during_a_sync_never_ends_completed(world: Any) -> None:
    w = world()
    operator = world()
    w.manager.enqueue(texts(120))
    assert w.manager.flush_queue(force=True).created == [1]
    answers: list[bool] = []

    def mid_download() -> None:
        if not answers:
            answers.append(operator.manager.cancel(1))

    w.manager.progress = mid_download
    w.manager.sync_status()
    assert answers == [True]
    b = w.store.batch(1)
    assert b.status == "FAILED" and b.error_message == "batch cancelled by operator", b
    assert w.store.queue_stats()["running"] == 0
    w.manager.progress = lambda: None
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    assert problems(w.store, w.dir, texts_once=False) == []


def test_cancel_during_a_submit_never_pays_twice(world: Any) -> None:
    """A batch without a job name may be in the middle of its submit: the cancel refuses (Busy, exit 75) instead of
    releasing chunks that are about to be in a paid job; every text ends in exactly one job."""
    w = world()
    operator = world()
    w.manager.enqueue(texts(80))
    outcome: list[Any] = []

    def mid_submit() -> None:
        if not outcome:
            try:
                outcome.append(operator.manager.cancel(1))
            except Busy as e:
                outcome.append(e)

    w.manager.progress = mid_submit
    w.manager.flush_queue(force=True)
    w.manager.progress = lambda: None
    for _ in range(3):
        w.manager.flush_queue(force=True)
        w.manager.sync_status()
    assert len(outcome) == 1
    if outcome[0] is True:  # a cancel that reports success must not have let the batch run on
        assert w.store.batch(1).status == "FAILED"
    else:
        assert isinstance(outcome[0], Busy)
    assert read_counters(w.dir)["creates"] == len(w.store.batches()) == 1
    assert problems(w.store, w.dir) == []


def test_cancel_of_a_batch_without_a_job_adopts_and_cancels_a_job_created_before_a_crash(world: Any) -> None:
    """Crash between the remote create and saving the job name: `cancel` must cancel that job too, or it runs
    (paid) while its chunks go into another batch."""
    w = world()
    w.manager.enqueue(texts(10))
    w.knobs(lose_create=1)
    w.manager.flush_queue(force=True)
    assert w.store.batch(1).google_job_id is None and read_counters(w.dir)["creates"] == 1
    assert w.manager.cancel(1) is True
    assert read_counters(w.dir)["cancels"] == 1
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    assert problems(w.store, w.dir, texts_once=False) == []


def test_cli_cancel_exits_75_while_a_step_may_be_submitting(world: Any, tmp_path: Path) -> None:
    from batchd.cli import main

    w = world()
    w.manager.enqueue(texts(5))
    w.manager.prepare()
    w.store.claim_batch(1000, "test-model", w.clock())  # PENDING, no job name yet
    cfg = tmp_path / "batchd.toml"
    cfg.write_text(f'[database]\npath = "{w.config.database.path}"\n[embedding]\n'
                   f'backend = "{w.config.embedding.backend}"\nmodel = "test-model"\ndimensions = 16\n')
    runner = CliRunner()
    with w.store.worker_lock():  # "the daemon is in the middle of a step"
        r = runner.invoke(main, ["--config", str(cfg), "cancel", "1"])
        assert r.exit_code == 75, r.output
        assert "is flushing or syncing" in r.output
    r = runner.invoke(main, ["--config", str(cfg), "cancel", "1"])
    assert r.exit_code == 0 and "cancelled batch 1" in r.output


def test_finish_batch_never_overwrites_a_cancelled_batch(world: Any) -> None:
    w = world()
    w.manager.enqueue(texts(5))
    w.manager.flush_queue(force=True)
    assert w.store.cancel_batch_locally(1, "batch cancelled by operator", w.clock()) == 5
    w.store.finish_batch(1, 3, w.clock(), status="COMPLETED")
    assert w.store.batch(1).status == "FAILED"
    assert w.store.cancel_batch_locally(1, "again", w.clock()) is None  # already final: nothing to cancel


def test_a_cancel_whose_remote_call_fails_changes_nothing(world: Any) -> None:
    """Releasing the chunks of a job that may still run would put their texts in two paid jobs."""
    from batchd.backends import BackendError

    w = world()
    w.manager.enqueue(texts(5))
    w.manager.flush_queue(force=True)
    w.knobs(cancel_errors=1)
    with pytest.raises(BackendError, match="cancel failed"):
        w.manager.cancel(1)
    assert w.store.batch(1).status == "RUNNING" and w.store.queue_stats()["running"] == 5
    assert w.manager.cancel(1) is True
    assert w.store.batch(1).status == "FAILED" and w.store.queue_stats()["pending"] == 5
