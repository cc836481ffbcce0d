"""The batchd command, as a real subprocess, on the Vertex backend against the fakes: check, enqueue,
run --until-idle (jobs finish when polled), search through the online predict."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from batchd.config import load
from batchd.store import Store
from tests.configs import merge, write_config
from tests.conftest import batchd_cmd
from tests.fakes.fake_vertex import fake_vector
from tests.fakes.vertex_env import BUCKET, fake_vertex, gcs, vertex_sections
from tests.storehelp import store_chunks, store_vector


def cli_config(tmp_path: Path, endpoint: str, bucket: str = BUCKET) -> Path:
    sections = merge(vertex_sections(tmp_path, endpoint, bucket=bucket, folder="cli"),
                     {"queue": {"min_batch_size": 1, "max_batch_size": 20}, "embedding": {"model": "gemini-embedding-001"}})
    return write_config(tmp_path / "batchd.toml", sections)


def batchd(config: Path, gcs_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs_url, BATCHD_CONFIG=str(config))
    return subprocess.run([*batchd_cmd(), *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


def test_cli_on_vertex(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url)
    texts = [f"manual page {i}" for i in range(50)]
    r = batchd(cfg, gcs.url, "enqueue", stdin="".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert r.returncode == 0, r.stderr  # enqueue creates the database (check never does)
    r = batchd(cfg, gcs.url, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ok    bucket gs://{BUCKET}" in r.stdout and "ok    vertex job service" in r.stdout

    fake_vertex.auto_finish = True
    r = batchd(cfg, gcs.url, "run", "--until-idle", "--poll", "50ms")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(fake_vertex.job_names()) == 3  # 50 chunks at max_batch_size 20

    store = Store.open(load(cfg))
    try:
        rows = store_chunks(store)
        assert [r["embedding_status"] for r in rows] == ["READY"] * 50
        assert all(store_vector(store, r["id"]) == fake_vector(r["text"], 8, unit=True) for r in rows)  # Gemini: unit
    finally:
        store.close()

    r = batchd(cfg, gcs.url, "search", "manual page 7", "-k", "1", "--json")
    assert r.returncode == 0, r.stderr
    [hit] = [json.loads(line) for line in r.stdout.splitlines()]
    assert hit["text"] == "manual page 7" and hit["distance"] < 1e-6
    assert fake_vertex.count("predict") == 1


def test_cli_check_names_what_fails(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, "http://127.0.0.1:9", bucket="no-such-bucket")
    r = batchd(cfg, gcs.url, "check")
    assert r.returncode == 1
    assert "FAIL  bucket gs://no-such-bucket" in r.stdout
    assert "FAIL  vertex job service" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
