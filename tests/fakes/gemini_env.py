"""Pytest fixtures for the gemini-api tests: the fake Gemini API, and a "world" (config, store, the REAL
GeminiApiBackend with the real google-genai client, BatchManager) wired to it.

Test modules import the fixtures: ``from tests.fakes.gemini_env import fake_gemini, gworld  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Config, from_dict
from tests.conftest import Clock, World, merge
from tests.fakes.fake_gemini_api import API_KEY, FakeGeminiApi


@pytest.fixture
def fake_gemini() -> Iterator[FakeGeminiApi]:
    with FakeGeminiApi() as fake:
        yield fake


def write_key(tmp_path: Path, key: str = API_KEY) -> Path:
    path = tmp_path / "gemini-api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def gemini_sections(tmp_path: Path, base_url: str) -> dict[str, dict[str, Any]]:
    """A config on the gemini-api backend at ``base_url``: tmp_path/app.db, 8 dimensions, short retries, no key
    (give one: ``api_key_file``, or a systemd credential). Merge the test's own keys over it."""
    return {
        "database": {"path": str(tmp_path / "app.db")},
        "embedding": {"backend": "gemini-api", "dimensions": 8},
        "gemini_api": {"base_url": base_url, "request_timeout": "10s", "retry_backoff": "10ms",
                       "retry_deadline": "2s"},
    }


def gemini_config(tmp_path: Path, fake: FakeGeminiApi, **sections: dict[str, Any]) -> Config:
    base = merge(gemini_sections(tmp_path, fake.url), {
        "queue": {"min_batch_size": 1, "max_batch_size": 1000, "max_attempts": 3},
        "gemini_api": {"api_key_file": str(write_key(tmp_path)), "retry_backoff": "5ms"},
    })
    return from_dict(merge(base, sections), source=str(tmp_path / "batchd.toml"))


class GeminiWorld(World):
    """A world on the REAL GeminiApiBackend, talking to ``fake``."""

    def __init__(self, config: Config, clock: Clock, fake: FakeGeminiApi):
        super().__init__(config, clock)
        self.fake = fake


@pytest.fixture
def gworld(tmp_path: Path, clock: Clock, fake_gemini: FakeGeminiApi,
           worlds: list[World]) -> Callable[..., GeminiWorld]:
    def make(**sections: dict[str, Any]) -> GeminiWorld:
        w = GeminiWorld(gemini_config(tmp_path, fake_gemini, **sections), clock, fake_gemini)
        worlds.append(w)
        return w

    return make
