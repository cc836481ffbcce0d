"""The Google side for tests and the benchmark: a storage emulator process and a fake JobService.

:class:`VertexServices` starts both (the benchmark uses it as is). The pytest fixtures share its parts: ``gcs``
(one emulator per module), ``fake_vertex`` and ``vworld`` (config, store, the REAL VertexBackend, BatchManager
wired to them). Test modules import the fixtures:
``from tests.fakes.vertex_env import gcs, fake_vertex, vworld  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Config, from_dict
from tests.conftest import Clock, World, merge
from tests.fakes.fake_vertex import FakeVertex
from tests.fakes.gcs import GCSEmulator

BUCKET = "batchd-test"
PROJECT = "proj"
LOCATION = "us-central1"


def start_gcs(bucket: str) -> GCSEmulator:
    emu = GCSEmulator().start()
    emu.ensure_bucket(bucket)
    return emu


def vertex_settings(endpoint: str, *, bucket: str = BUCKET, project: str = PROJECT, location: str = LOCATION,
                    folder: str = "stage") -> dict[str, Any]:
    """The [vertex] section that points VertexBackend at the fakes (the fake JobService at ``endpoint``)."""
    return {"project": project, "location": location, "staging_uri": f"gs://{bucket}/{folder}",
            "api_endpoint": endpoint, "credentials": "anonymous"}


def vertex_sections(tmp_path: Path, endpoint: str, **settings: Any) -> dict[str, dict[str, Any]]:
    """A config on the Vertex backend and the fakes: tmp_path/app.db, text-embedding-005 at 8 dimensions,
    short retries; ``settings`` as for :func:`vertex_settings`. Merge the test's own keys over it."""
    return {
        "database": {"path": str(tmp_path / "app.db")},
        "embedding": {"backend": "vertex", "model": "text-embedding-005", "dimensions": 8},
        "vertex": {**vertex_settings(endpoint, **settings), "request_timeout": "10s", "retry_backoff": "10ms",
                   "retry_deadline": "2s"},
    }


class VertexServices:
    """The storage emulator (a fake-gcs-server subprocess) with one bucket and the fake JobService (a thread of
    this process), as one context manager. A child process running VertexBackend needs :attr:`env`."""

    def __init__(self, *, bucket: str = BUCKET, project: str = PROJECT, location: str = LOCATION):
        self.bucket, self.project, self.location = bucket, project, location

    def __enter__(self) -> VertexServices:
        self.gcs = start_gcs(self.bucket)
        self.client = self.gcs.client()
        self.fake = FakeVertex(self.client, project=self.project, location=self.location).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fake.stop()
        self.gcs.stop()

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.gcs.url}

    @property
    def settings(self) -> dict[str, Any]:
        return vertex_settings(self.fake.url, bucket=self.bucket, project=self.project, location=self.location)


@pytest.fixture(scope="module")
def gcs() -> Iterator[GCSEmulator]:
    emu = start_gcs(BUCKET)
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
    base = merge(vertex_sections(tmp_path, fake.url), {
        "queue": {"min_batch_size": 1, "max_batch_size": 1000, "max_attempts": 3},
        "vertex": {"retry_backoff": "5ms", "retry_deadline": "3s"},
    })
    return from_dict(merge(base, sections), source=str(tmp_path / "batchd.toml"))


class VertexWorld(World):
    """A world on the REAL VertexBackend, talking to ``fake`` and the storage emulator ``gcs``."""

    def __init__(self, config: Config, clock: Clock, fake: FakeVertex, gcs: GCSEmulator):
        super().__init__(config, clock)
        self.fake = fake
        self.gcs = gcs

    def staged(self, batch_id: int, name: str = "input.jsonl") -> bytes:
        return self.gcs.read(BUCKET, self.backend.batch_prefix(batch_id) + name)

    def objects(self, batch_id: int) -> list[str]:
        return self.gcs.names(BUCKET, self.backend.batch_prefix(batch_id))


@pytest.fixture
def vworld(tmp_path: Path, clock: Clock, fake_vertex: FakeVertex, gcs: GCSEmulator,
           worlds: list[World]) -> Callable[..., VertexWorld]:
    def make(**sections: dict[str, Any]) -> VertexWorld:
        w = VertexWorld(vertex_config(tmp_path, fake_vertex, **sections), clock, fake_vertex, gcs)
        worlds.append(w)
        return w

    return make
