"""A copied or restored database never touches the original's jobs or files (issue 9, item 4).

Both databases share one "Google project": the test backend's folder ($BATCHD_TEST_BACKEND_DIR). The copy is made
the way backups are, with SQLite's online backup API from the application's own connection, while a batch of the
original is in flight.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.membackend import read_counters
from tests.faults.invariants import problems, remote_jobs
from tests.storehelp import store_chunks


@pytest.fixture
def shared_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "testbackend"
    monkeypatch.setenv("BATCHD_TEST_BACKEND_DIR", str(folder))
    return folder


def backup(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def drive(w: Any) -> None:
    for _ in range(5):
        w.manager.flush_queue(force=True)
        w.manager.sync_status()


def test_a_copy_gets_its_own_instance_and_leaves_the_originals_jobs_alone(world: Any, tmp_path: Path,
                                                                         shared_project: Path) -> None:
    original = world()
    original.manager.enqueue([(None, f"shared text {i}") for i in range(50)])
    assert original.manager.flush_queue(force=True).created == [1]
    copy_path = tmp_path / "staging" / "app.db"
    backup(original.config.database.path, copy_path)

    copy = world(database={"path": str(copy_path)})
    assert copy.store.instance_id != original.store.instance_id
    b = copy.store.batch(1)
    assert b.status == "FAILED" and "copied or restored" in b.error_message, b
    assert original.store.instance_id in b.error_message
    st = copy.store.queue_stats()
    assert st["running"] == 0 and st["pending"] == 50  # queued again, no attempt counted
    assert all(c["attempts"] == 0 for c in store_chunks(copy.store))

    drive(copy)
    drive(original)
    assert "cancels" not in read_counters(shared_project)  # nobody cancelled anybody's job
    assert problems(original.store, shared_project) == []
    assert problems(copy.store, shared_project) == []
    assert len(remote_jobs(shared_project, original.store.instance_id)) == 1
    assert [j["batch_id"] for j in remote_jobs(shared_project, copy.store.instance_id)] == [2]


def test_the_same_file_under_any_name_is_not_a_copy(world: Any, tmp_path: Path, shared_project: Path) -> None:
    import os

    w = world()
    w.manager.enqueue([(None, "x"), (None, "y")])
    w.manager.flush_queue(force=True)
    link = tmp_path / "link.db"
    os.symlink(w.config.database.path, link)
    again = world()
    via_link = world(database={"path": str(link)})
    assert again.store.instance_id == via_link.store.instance_id == w.store.instance_id
    assert w.store.batch(1).status == "RUNNING"


def test_a_copy_is_detected_once(world: Any, tmp_path: Path, shared_project: Path) -> None:
    w = world()
    copy_path = tmp_path / "restored" / "app.db"
    backup(w.config.database.path, copy_path)
    first = world(database={"path": str(copy_path)})
    second = world(database={"path": str(copy_path)})
    assert first.store.instance_id == second.store.instance_id != w.store.instance_id


def test_a_backup_restored_in_place_is_recognised(world: Any, tmp_path: Path, shared_project: Path) -> None:
    """The backup written over the original file (same inode): the lock file remembers batches claimed after the
    backup was taken, so the restored file gets a new instance and never reuses the original's batch labels."""
    import shutil

    w = world()
    w.manager.enqueue([(None, f"before the backup {i}") for i in range(10)])
    drive(w)
    db = Path(w.config.database.path)
    saved = tmp_path / "backup.db"
    backup(str(db), saved)
    w.manager.enqueue([(None, f"after the backup {i}") for i in range(10)])
    w.manager.flush_queue(force=True)  # batch 2, RUNNING under the original instance
    original_instance, inode = w.store.instance_id, db.stat().st_ino
    w.store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(saved, db)  # in place: same inode
    assert db.stat().st_ino == inode

    restored = world()
    assert restored.store.instance_id != original_instance
    assert [b.status for b in restored.store.batches()] == ["COMPLETED"]  # the backup's state, untouched
    restored.manager.enqueue([(None, f"after the restore {i}") for i in range(10)])
    drive(restored)
    assert problems(restored.store, shared_project) == []
    assert len(remote_jobs(shared_project, original_instance)) == 2  # the original's two jobs, untouched
    again = world()
    assert again.store.instance_id == restored.store.instance_id  # detected once
