"""Configuration: TOML -> frozen dataclasses, every key validated.

Parsing has no side effects: it reads one file and returns data or raises
:class:`ConfigError`, whose message names the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.backends.models import GEMINI_API_SERVICE

DEFAULT_PATH = "/etc/batchd/batchd.toml"
ENV_VAR = "BATCHD_CONFIG"

TASK_TYPES = (
    "RETRIEVAL_QUERY",
    "RETRIEVAL_DOCUMENT",
    "SEMANTIC_SIMILARITY",
    "CLASSIFICATION",
    "CLUSTERING",
    "QUESTION_ANSWERING",
    "FACT_VERIFICATION",
    "CODE_RETRIEVAL_QUERY",
)
# Rows per batch job, by model family (VERTEX.md).
CLASSIC_MODELS = ("text-embedding-005", "text-multilingual-embedding-002", "text-embedding-004")
CLASSIC_MAX_ROWS = 30_000
GEMINI_MAX_ROWS = 1_000_000
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("vertex", "gemini-api", "local")
# [embedding] keys whose default depends on the backend, used when the file does not set them.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemini-api": {"model": "gemini-embedding-001", "dimensions": 768},
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GS_URI = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(/[^\s]*)?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(Exception):
    """A configuration problem. ``str()`` is one line: ``file: key: reason``."""

    def __init__(self, path: str | os.PathLike[str] | None, key: str | None, reason: str):
        self.path = str(path) if path is not None else "<config>"
        self.key = key
        self.reason = reason
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


def parse_duration(value: str) -> float:
    """'30s', '5m', '24h', '2d', '500ms' -> seconds. Raises ValueError."""
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration like '30s', '5m' or '24h'")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Duration(float):
    """Seconds, written in TOML as a string with a unit."""


@dataclass(frozen=True)
class DatabaseConfig:
    path: str = "/var/lib/batchd/batchd.db"
    chunks_table: str = "chunks"
    id_column: str = "id"
    text_column: str = "content"


@dataclass(frozen=True)
class QueueConfig:
    min_batch_size: int = 100
    max_batch_size: int = 30_000
    max_wait: Duration = Duration(30 * 60)
    flush_interval: Duration = Duration(60)
    sync_interval: Duration = Duration(5 * 60)
    max_attempts: int = 3
    job_timeout: Duration = Duration(48 * 3600)
    max_running_jobs: int = 4


@dataclass(frozen=True)
class EmbeddingConfig:
    backend: str = "vertex"
    model: str = "text-embedding-005"
    dimensions: int = 768
    task_type: str = "RETRIEVAL_DOCUMENT"

    @property
    def family(self) -> str:
        return "gemini" if self.model.startswith("gemini-") else "classic"

    @property
    def max_rows(self) -> int:
        return GEMINI_MAX_ROWS if self.family == "gemini" else CLASSIC_MAX_ROWS


@dataclass(frozen=True)
class VertexConfig:
    project: str = ""
    location: str = "us-central1"
    staging_uri: str = ""
    api_endpoint: str = ""
    credentials: str = "default"
    cleanup: bool = True
    request_timeout: Duration = Duration(60)
    retry_backoff: Duration = Duration(1)  # first wait after a 429/5xx; doubles, with jitter
    retry_deadline: Duration = Duration(300)  # give up retrying one call after this long

    @property
    def bucket(self) -> str:
        m = _GS_URI.match(self.staging_uri)
        return m.group(1) if m else ""

    @property
    def prefix(self) -> str:
        m = _GS_URI.match(self.staging_uri)
        return (m.group(2) or "").strip("/") if m else ""


@dataclass(frozen=True)
class GeminiApiConfig:
    """The Gemini Developer API's Batch Mode (backend "gemini-api"): an API key, no bucket, no project."""

    api_key_file: str = ""  # empty: $CREDENTIALS_DIRECTORY/gemini-api-key (LoadCredential=), else $GEMINI_API_KEY
    base_url: str = ""  # empty: Google's endpoint; an http(s):// URL for emulators and tests
    cleanup: bool = True
    request_timeout: Duration = Duration(60)
    retry_backoff: Duration = Duration(1)  # first wait after a 429/5xx; doubles, with jitter
    retry_deadline: Duration = Duration(300)  # give up retrying one call after this long


@dataclass(frozen=True)
class LocalConfig:
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 64
    slice_size: int = 256
    device: str = "cpu"


@dataclass(frozen=True)
class DaemonConfig:
    log_level: str = "info"


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    vertex: VertexConfig = field(default_factory=VertexConfig)
    gemini_api: GeminiApiConfig = field(default_factory=GeminiApiConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: str = "<defaults>"

    @property
    def state_dir(self) -> Path:
        """Folder for batchd's own files (local job inputs), next to the database."""
        return Path(self.database.path).resolve().parent


def resolve_path(cli_path: str | None) -> str:
    """--config, else $BATCHD_CONFIG, else /etc/batchd/batchd.toml."""
    return cli_path or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file. Raises ConfigError (never OSError or TOMLDecodeError)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(p, None, "file not found") from None
    except OSError as e:
        raise ConfigError(p, None, f"cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(p, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"invalid TOML: {e}") from None
    return from_dict(data, source=str(p))


def from_dict(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a Config from parsed TOML (also handy for tests). Raises ConfigError."""
    sections: dict[str, Any] = {}
    section_types = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "source"}
    hints = typing.get_type_hints(Config)
    for name, value in data.items():
        if name not in section_types:
            raise ConfigError(source, name, f"unknown section (expected one of: {', '.join(section_types)})")
        if not isinstance(value, dict):
            raise ConfigError(source, name, "must be a table, like [" + name + "]")
        sections[name] = _build_section(hints[name], value, name, source)
    _apply_backend_defaults(sections, data.get("embedding") or {})
    cfg = Config(**sections, source=source)
    _validate(cfg)
    return cfg


def _apply_backend_defaults(sections: dict[str, Any], written: Mapping[str, Any]) -> None:
    """Fill the [embedding] keys the file left out with the chosen backend's defaults (BACKEND_DEFAULTS)."""
    emb = sections.get("embedding")
    if emb is None:
        return
    unset = {k: v for k, v in BACKEND_DEFAULTS.get(emb.backend, {}).items() if k not in written}
    if unset:
        sections["embedding"] = dataclasses.replace(emb, **unset)


def _build_section(cls: type, values: Mapping[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in known:
            raise ConfigError(source, dotted, f"unknown key (expected one of: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(hints[key], value, dotted, source)
    return cls(**kwargs)


def _coerce(typ: Any, value: Any, key: str, source: str) -> Any:
    if typ is Duration:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(source, key, f"expected a duration like \"30s\", got {_tname(value)}")
        if isinstance(value, str):
            try:
                secs = parse_duration(value)
            except ValueError as e:
                raise ConfigError(source, key, str(e)) from None
        else:
            secs = float(value)
        if secs <= 0:
            raise ConfigError(source, key, "must be greater than zero")
        return Duration(secs)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_tname(value)}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_tname(value)}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_tname(value)}")
        return value
    if isinstance(typ, types.UnionType):  # pragma: no cover - no such keys yet
        return value
    raise AssertionError(f"unhandled config type {typ!r} for {key}")


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _validate(cfg: Config) -> None:
    src = cfg.source
    db, q, emb, vx, loc = cfg.database, cfg.queue, cfg.embedding, cfg.vertex, cfg.local

    if not db.path:
        raise ConfigError(src, "database.path", "must not be empty")
    for key in ("chunks_table", "id_column", "text_column"):
        if not _IDENT.match(getattr(db, key)):
            raise ConfigError(src, f"database.{key}", "must be a plain SQL identifier (letters, digits, _)")

    for key in ("min_batch_size", "max_batch_size", "max_attempts", "max_running_jobs"):
        if getattr(q, key) < 1:
            raise ConfigError(src, f"queue.{key}", "must be at least 1")
    if q.min_batch_size > q.max_batch_size:
        raise ConfigError(src, "queue.min_batch_size",
                          f"{q.min_batch_size} is greater than queue.max_batch_size ({q.max_batch_size})")

    if emb.backend not in BACKENDS and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", emb.backend):
        raise ConfigError(src, "embedding.backend",
                          f"must be \"vertex\", \"gemini-api\", \"local\" or a plugin \"package.module:Class\", "
                          f"got {emb.backend!r}")
    if emb.dimensions <= 0:
        raise ConfigError(src, "embedding.dimensions", "must be greater than zero")
    if emb.dimensions > 8192:
        raise ConfigError(src, "embedding.dimensions", "must be at most 8192 (sqlite-vec's limit)")
    if emb.task_type not in TASK_TYPES:
        raise ConfigError(src, "embedding.task_type", f"must be one of {', '.join(TASK_TYPES)}")
    if not emb.model:
        raise ConfigError(src, "embedding.model", "must not be empty")
    if emb.backend == "vertex" and q.max_batch_size > emb.max_rows:
        raise ConfigError(src, "queue.max_batch_size",
                          f"{q.max_batch_size} exceeds the {emb.max_rows} rows a {emb.model} batch job accepts")

    if vx.staging_uri and not _GS_URI.match(vx.staging_uri):
        raise ConfigError(src, "vertex.staging_uri", f"{vx.staging_uri!r} is not a gs://bucket/prefix URI")
    if vx.api_endpoint and not re.match(r"^(https?://)?[A-Za-z0-9.\-\[\]:]+(:\d+)?/?$", vx.api_endpoint):
        raise ConfigError(src, "vertex.api_endpoint", f"{vx.api_endpoint!r} is not a host[:port] or http(s):// URL")
    if not vx.location:
        raise ConfigError(src, "vertex.location", "must not be empty")
    if vx.retry_backoff > vx.retry_deadline:
        raise ConfigError(src, "vertex.retry_backoff",
                          f"{vx.retry_backoff:g}s is longer than vertex.retry_deadline ({vx.retry_deadline:g}s)")
    if not vx.credentials:
        raise ConfigError(src, "vertex.credentials",
                          "must be \"default\", \"anonymous\" or the path of a service-account JSON file")

    _validate_gemini_api(cfg)

    if loc.batch_size < 1:
        raise ConfigError(src, "local.batch_size", "must be at least 1")
    if loc.slice_size < 1:
        raise ConfigError(src, "local.slice_size", "must be at least 1")

    if cfg.daemon.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(src, "daemon.log_level", f"must be one of {', '.join(LOG_LEVELS)}")


def _validate_gemini_api(cfg: Config) -> None:
    src, ga, emb = cfg.source, cfg.gemini_api, cfg.embedding
    if ga.base_url and not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?(/[^\s]*)?$", ga.base_url):
        raise ConfigError(src, "gemini_api.base_url", f"{ga.base_url!r} is not an http(s):// URL")
    if ga.retry_backoff > ga.retry_deadline:
        raise ConfigError(src, "gemini_api.retry_backoff",
                          f"{ga.retry_backoff:g}s is longer than gemini_api.retry_deadline ({ga.retry_deadline:g}s)")
    if emb.backend == "gemini-api" and cfg.queue.max_running_jobs > GEMINI_API_SERVICE.max_concurrent_batches:
        raise ConfigError(src, "queue.max_running_jobs",
                          f"{cfg.queue.max_running_jobs} is more than the {GEMINI_API_SERVICE.max_concurrent_batches} "
                          f"concurrent batches the Gemini API allows per project")
    if emb.backend == "gemini-api" and emb.model.startswith("gemini-") and emb.dimensions > 3072:
        raise ConfigError(src, "embedding.dimensions",
                          f"{emb.dimensions} is more than the 3072 dimensions {emb.model} produces")


def vertex_missing(cfg: Config) -> list[str]:
    """Keys the Vertex backend needs that are not set, as human lines (for `batchd check`)."""
    missing = []
    if not cfg.vertex.project:
        missing.append("vertex.project is not set (the Google Cloud project that runs the jobs)")
    if not cfg.vertex.staging_uri:
        missing.append("vertex.staging_uri is not set (a gs://bucket/prefix for job input and output)")
    return missing
