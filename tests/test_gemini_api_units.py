"""The gemini-api backend's pure parts: its config section and defaults, where the API key comes from, and the
JSON Lines it writes and reads (no network)."""

from __future__ import annotations

import math
from array import array
from pathlib import Path

import orjson
import pytest

from batchd.backends import BackendContext, Item, make_backend
from batchd.backends.gemini_api import GeminiApiBackend, SetupError, resolve_api_key
from batchd.backends.gemini_api_lines import GeminiApiLines
from batchd.config import ConfigError, from_dict, load
from tests.conftest import REPO


def test_backend_defaults_and_explicit_keys() -> None:
    cfg = from_dict({"embedding": {"backend": "gemini-api"}})
    assert (cfg.embedding.model, cfg.embedding.dimensions) == ("gemini-embedding-001", 768)
    cfg = from_dict({"embedding": {"backend": "gemini-api", "dimensions": 1536}})
    assert (cfg.embedding.model, cfg.embedding.dimensions) == ("gemini-embedding-001", 1536)
    assert from_dict({}).embedding.model == "text-embedding-005"  # other backends keep theirs
    assert isinstance(make_backend(cfg, "abc123"), GeminiApiBackend)


def test_shipped_config_documents_the_section() -> None:
    cfg = load(REPO / "etc" / "batchd.toml")
    assert cfg.gemini_api.api_key_file == "" and cfg.gemini_api.base_url == "" and cfg.gemini_api.cleanup


@pytest.mark.parametrize("section, key, reason", [
    ({"gemini_api": {"base_url": "localhost:8080"}}, "gemini_api.base_url", "is not an http(s):// URL"),
    ({"gemini_api": {"retry_backoff": "10m", "retry_deadline": "1m"}}, "gemini_api.retry_backoff", "longer than"),
    ({"gemini_api": {"api_key": "x"}}, "gemini_api.api_key", "unknown key"),
    ({"embedding": {"backend": "gemini-api", "dimensions": 4096}}, "embedding.dimensions", "3072"),
    ({"embedding": {"backend": "gemini-api"}, "queue": {"max_running_jobs": 101}}, "queue.max_running_jobs",
     "100 concurrent batches"),
])
def test_config_errors_name_the_key(section, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(section, source="/etc/batchd/batchd.toml")
    assert e.value.key == key and reason in e.value.reason


def test_key_sources_in_order(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("  from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gemini-api-key").write_text("from-systemd\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "GEMINI_API_KEY": "from-env", "GOOGLE_API_KEY": "never"}
    assert resolve_api_key(str(f), env) == ("from-file", f"gemini_api.api_key_file ({f})")
    assert resolve_api_key("", env) == ("from-systemd", "systemd credential gemini-api-key")
    del env["CREDENTIALS_DIRECTORY"]
    assert resolve_api_key("", env) == ("from-env", "$GEMINI_API_KEY")
    del env["GEMINI_API_KEY"]
    with pytest.raises(SetupError, match="no Gemini API key"):
        resolve_api_key("", env)  # GOOGLE_API_KEY is never used
    with pytest.raises(SetupError, match="does not exist"):
        resolve_api_key(str(tmp_path / "missing"), env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SetupError, match="is empty"):
        resolve_api_key(str(tmp_path / "empty"), env)


def test_input_line_is_flat_and_keyed() -> None:
    line = orjson.loads(GeminiApiLines("RETRIEVAL_DOCUMENT", 768).input_line(Item("k1", "hello")))
    assert line == {"key": "k1", "request": {"content": {"parts": [{"text": "hello"}]},
                                             "task_type": "RETRIEVAL_DOCUMENT", "output_dimensionality": 768}}


def test_input_file_names_fit_the_files_api(tmp_path: Path) -> None:
    cfg = from_dict({"database": {"path": str(tmp_path / "a.db")}, "embedding": {"backend": "gemini-api"}})
    b = GeminiApiBackend(cfg.gemini_api, BackendContext.of(cfg, "0a1b2c3d4e5f"))
    assert b.input_file(7) == "files/batchd-0a1b2c3d4e5f-7" and b.display_name(7) == "batchd-0a1b2c3d4e5f-7"
    long = GeminiApiBackend(cfg.gemini_api, BackendContext.of(cfg, "X" * 40)).input_file(123456789)
    ident = long.removeprefix("files/")
    assert len(ident) <= 40 and ident == ident.lower() and not ident.startswith("-")


def _values(blob: bytes) -> list[float]:
    return array("f", blob).tolist()


def test_output_lines() -> None:
    lines = GeminiApiLines("RETRIEVAL_DOCUMENT", 2)
    ok = lines.parse(b'{"key": "a", "response": {"embedding": {"values": [3, 4, 12]}, "tokenCount": "7"}}')
    assert ok.keys == ("a",) and ok.token_count == 7 and ok.cut and ok.answered_dims == 3
    assert _values(ok.vector) == pytest.approx([0.6, 0.8])  # cut to 2 and renormalised
    ok = lines.parse(b'{"key": "b", "response": {"embedding": {"values": [1, 1]}, "tokenCount": 3}}')
    assert not ok.cut and ok.token_count == 3 and _values(ok.vector) == pytest.approx([1 / math.sqrt(2)] * 2)
    err = lines.parse(b'{"key": "c", "error": {"code": 400, "message": "blocked", "status": "INVALID_ARGUMENT"}}')
    assert err.error == "blocked" and err.vector is None
    assert lines.parse(b'{"key": "d", "status": {"code": 13, "message": "internal"}}').error == "internal"
    for raw, reason in [(b'{"key": "e", "response": {}}', "no embedding"),
                        (b'{"key": "f", "response": {"embedding": {"values": [1]}}}', "expected 2"),
                        (b'{"key": "g", "response": {"embedding": {"values": [0, 0]}}}', "zero length"),
                        (b'{"key": "h", "response": {"embedding": {"values": [true, 1]}}}', "not numbers")]:
        line = lines.parse(raw)
        assert line.keys and reason in line.error, raw
    for raw in (b"{not json", b"[1, 2]", b'{"response": {"embedding": {"values": [1, 1]}}}'):
        assert lines.parse(raw) is None
    full = GeminiApiLines("RETRIEVAL_DOCUMENT", 3072)
    assert not full.renormalise  # only the full 3,072-value output comes unit length
