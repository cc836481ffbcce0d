"""Pytest fixtures for the Vertex tests: a storage emulator process, a fake JobService, and a "world"
(config, store, the REAL VertexBackend, BatchManager) wired to them.

Test modules import the fixtures: ``from tests.fakes.vertex_env import gcs, fake_vertex, vworld  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.backends.vertex import VertexBackend
from batchd.config import Config, from_dict
from batchd.manager import BatchManager
from batchd.store import Store
from tests.conftest import Clock, merge
from tests.fakes.fake_vertex import FakeVertex
from tests.fakes.gcs import GCSEmulator

BUCKET = "batchd-test"
PROJECT = "proj"
LOCATION = "us-central1"


@pytest.fixture(scope="module")
def gcs() -> Iterator[GCSEmulator]:
    emu = GCSEmulator().start()
    emu.ensure_bucket(BUCKET)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def fake_vertex(gcs: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVertex]:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    with FakeVertex(gcs.client(), project=PROJECT, location=LOCATION) as fake:
        yield fake


def vertex_config(tmp_path: Path, fake: FakeVertex, **sections: dict[str, Any]) -> Config:
    base = {
        "database": {"path": str(tmp_path / "app.db")},
        "queue": {"min_batch_size": 1, "max_batch_size": 1000, "max_attempts": 3},
        "embedding": {"backend": "vertex", "model": "text-embedding-005", "dimensions": 8},
        "vertex": {"project": PROJECT, "location": LOCATION, "staging_uri": f"gs://{BUCKET}/stage",
                   "api_endpoint": fake.url, "credentials": "anonymous", "request_timeout": "10s",
                   "retry_backoff": "5ms", "retry_deadline": "3s"},
    }
    return from_dict(merge(base, sections), source=str(tmp_path / "batchd.toml"))


class VertexWorld:
    def __init__(self, config: Config, clock: Clock, fake: FakeVertex, gcs: GCSEmulator):
        self.config = config
        self.clock = clock
        self.fake = fake
        self.gcs = gcs
        self.store = Store.open(config)
        self.backend = VertexBackend(config, self.store.instance_id)
        self.manager = BatchManager(self.store, self.backend, config, clock=clock)

    def staged(self, batch_id: int, name: str = "input.jsonl") -> bytes:
        return self.gcs.read(BUCKET, self.backend.batch_prefix(batch_id) + name)

    def objects(self, batch_id: int) -> list[str]:
        return self.gcs.names(BUCKET, self.backend.batch_prefix(batch_id))


@pytest.fixture
def vworld(tmp_path: Path, clock: Clock, fake_vertex: FakeVertex, gcs: GCSEmulator) -> Iterator[Callable[..., VertexWorld]]:
    made: list[VertexWorld] = []

    def make(**sections: dict[str, Any]) -> VertexWorld:
        w = VertexWorld(vertex_config(tmp_path, fake_vertex, **sections), clock, fake_vertex, gcs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.store.close()
