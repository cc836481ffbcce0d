"""Configuration: TOML -> frozen dataclasses, every key validated.

Parsing has no side effects: it reads one file and returns data or raises
:class:`ConfigError`, whose message names the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.backends import models as _models
from batchd.backends.gemini_api_settings import GeminiApiSettings
from batchd.backends.local_settings import LocalSettings
from batchd.backends.models import GEMINI_API_SERVICE
from batchd.backends.vertex_settings import VertexSettings
from batchd.errors import BatchdError
from batchd.settings import Duration, SettingError

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
# Model families (rows per job, dimensions, ...) live in one table: batchd.backends.models.
CLASSIC_MODELS = _models.CLASSIC_MODELS
CLASSIC_MAX_ROWS = _models.CLASSIC.max_rows
GEMINI_MAX_ROWS = _models.GEMINI.max_rows
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_PARSE_WORKERS = 16
BACKENDS = ("vertex", "gemini-api", "local")
# [embedding] keys whose default depends on the backend, used when the file does not set them.
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Every duration lies in [1ms, 365d]: below, it is a typo ("0.0000001ms"); above, it is a typo too
# ("100000000000000000000d" overflowed the scheduler's timedelta and crashed `run`).
MIN_DURATION = 0.001
MAX_DURATION = 365 * 86400.0
# Every integer key is at most this: SQLite binds 64-bit integers, and no sane queue setting comes close.
MAX_INT = 1_000_000_000
# Columns batchd adds to the application's table and tables it owns (store migrations create exactly these;
# tests/test_config.py checks they agree). The configured id/text column or table must not be one of them.
BATCHD_COLUMNS = ("embedding_status", "batch_job_id", "error_message", "attempts", "content_hash", "embedded_at",
                  "queued_at", "truncated")
BATCHD_TABLES = ("batch_jobs", "chunks_vec", "batchd_meta", "batchd_tombstones", "batchd_copies")
# Defaults that depend on the backend, for the keys an operator did not set (etc/batchd.toml shows each of them
# commented out, with every backend's value). A Vertex AI or Gemini API batch job is half the online price but
# takes minutes to hours to start and finish: gather many chunks per job and poll every few minutes. The local
# model starts at once: flush whatever is pending and embed it right away. A plugin backend gets the Vertex
# values, which are also the dataclasses' own defaults below.
_BATCH_SERVICE_QUEUE = {"queue.min_batch_size": 100, "queue.max_wait": "30m", "queue.flush_interval": "1m",
                        "queue.sync_interval": "5m"}
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "vertex": {"embedding.model": "text-embedding-005", "embedding.dimensions": 768, **_BATCH_SERVICE_QUEUE},
    "gemini-api": {"embedding.model": "gemini-embedding-001", "embedding.dimensions": 768, **_BATCH_SERVICE_QUEUE},
    # embedding.model: the name of [local] model (all-MiniLM-L6-v2 unless set), so the content hashes name it.
    "local": {"embedding.model": "all-MiniLM-L6-v2", "embedding.dimensions": 384, "queue.min_batch_size": 1,
              "queue.max_wait": "5s", "queue.flush_interval": "5s", "queue.sync_interval": "5s"},
}


class ConfigError(BatchdError):
    """A configuration problem. ``str()`` is one line: ``file: key: reason``.

    Characters that are not printable (a newline in a quoted TOML key, a NUL) are shown escaped, so the
    message stays one line whatever the file holds.
    """

    def __init__(self, path: str | os.PathLike[str] | None, key: str | None, reason: str):
        self.path = str(path) if path is not None else "<config>"
        self.key = key
        self.reason = reason
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(_printable(where + reason))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_duration(value: str) -> float:
    """'30s', '5m', '24h', '2d', '500ms' -> seconds. Raises ValueError (also outside 1ms..365d)."""
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration like '30s', '5m' or '24h'")
    secs = float(m.group(1)) * _UNITS[m.group(2)]
    check_duration(secs, value)
    return secs


def check_duration(secs: float, shown: object) -> None:
    """Raise ValueError unless ``secs`` is a finite number of seconds in [MIN_DURATION, MAX_DURATION]."""
    if not math.isfinite(secs):
        raise ValueError(f"{shown!r} is not a finite duration")
    if secs <= 0:
        raise ValueError("must be greater than zero")
    if secs < MIN_DURATION:
        raise ValueError(f"{shown!r} is shorter than 1ms")
    if secs > MAX_DURATION:
        raise ValueError(f"{shown!r} is longer than 365d")


def format_duration(seconds: float, *, exact: bool = True) -> str:
    """Seconds as an operator writes them, the inverse of :func:`parse_duration`.

    ``exact`` (a configured value: ``job timed out after 2h``): the largest unit that divides it exactly
    (5400 -> ``90m``), else seconds (``61.5s``). Not exact (an age: ``3h`` old): the largest unit it reaches,
    rounded down (5400 -> ``1h``; 42.7 -> ``42s``).
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and (not exact or seconds % size == 0):
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s" if exact else f"{int(seconds)}s"


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
    max_batch_characters: int = 0  # 0 = only the model's own limits


@dataclass(frozen=True)
class EmbeddingConfig:
    backend: str = "vertex"
    model: str = "text-embedding-005"
    dimensions: int = 768
    task_type: str = "RETRIEVAL_DOCUMENT"
    auto_truncate: bool = True  # False: a text over the model's input limit is FAILED instead of sent

    @property
    def family(self) -> str:
        """The model's family name in batchd.backends.models ("classic", "gemini")."""
        return _models.family_of(self.model).name

    @property
    def max_rows(self) -> int:
        """Rows one batch job of this model accepts (batchd.backends.models)."""
        return _models.family_of(self.model).max_rows or QueueConfig.max_batch_size


# The built-in backends' sections are owned by the backends (their settings modules); listed here so that the
# file is parsed in one pass. Old names kept for code that imports them from here.
VertexConfig = VertexSettings
GeminiApiConfig = GeminiApiSettings
LocalConfig = LocalSettings


@dataclass(frozen=True)
class DaemonConfig:
    log_level: str = "info"
    # Processes that parse a finished job's output beside the download (batchd.parse_pool): "auto" (up to 2, for
    # batches of 5,000 texts or more, on 2+ CPUs), or a number; 0 parses in the daemon's own process.
    parse_workers: int | str = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    textfile: str = ""  # a .prom file rewritten after every step (node_exporter's textfile collector)
    listen: str = ""  # "127.0.0.1:9464": serve /metrics and /healthz over HTTP (daemon only)

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class BudgetConfig:
    daily_usd: float = 0.0  # 0 = no limit; UTC days
    monthly_usd: float = 0.0  # 0 = no limit; UTC calendar months


@dataclass(frozen=True)
class PricingConfig:
    model: str = ""  # empty: the built-in prices (batchd/pricing.py) for every model
    unit: str = "1m_tokens"  # "1k_characters" | "1m_tokens"
    batch_usd: float = 0.0
    online_usd: float = 0.0


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    vertex: VertexSettings = field(default_factory=VertexSettings)
    gemini_api: GeminiApiSettings = field(default_factory=GeminiApiSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    # [plugin.<name>] tables, as written: each belongs to the plugin backend that declares that section, and is
    # built and validated by the plugin's own settings class when the backend is made (make_backend).
    plugin: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
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
    data = with_backend_defaults(data)
    sections: dict[str, Any] = {}
    section_types = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("source", "plugin")}
    hints = typing.get_type_hints(Config)
    for name, value in data.items():
        if name == "plugin":
            sections[name] = _plugin_tables(value, source)
            continue
        if name not in section_types:
            raise ConfigError(source, name, f"unknown section (expected one of: {', '.join(section_types)}, "
                                            "plugin.<name>)")
        if not isinstance(value, dict):
            raise ConfigError(source, name, "must be a table, like [" + name + "]")
        sections[name] = build_settings(hints[name], value, name, source)
    cfg = Config(**sections, source=source)
    _validate(cfg)
    return cfg


def with_backend_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with BACKEND_DEFAULTS filled in for the keys it does not set (what it sets always wins)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    emb = out.get("embedding")
    backend = emb.get("backend", "vertex") if isinstance(emb, dict) else "vertex"
    defaults = dict(BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS["vertex"]) if isinstance(backend, str)
                    else BACKEND_DEFAULTS["vertex"])
    local = out.get("local")
    if backend == "local" and isinstance(local, dict) and isinstance(local.get("model"), str) and local["model"]:
        defaults["embedding.model"] = Path(local["model"]).name or local["model"]
    for dotted, value in defaults.items():
        section, key = dotted.split(".", 1)
        table = out.setdefault(section, {})
        if isinstance(table, dict):  # anything else is reported by from_dict
            table.setdefault(key, value)
    return out


def _plugin_tables(value: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(source, "plugin", "must hold tables named after their backend, like [plugin.mybackend]")
    for name in value:
        if not _IDENT.match(name):
            raise ConfigError(source, f"plugin.{name}", "must be a plain name (letters, digits, _)")
    return {k: dict(v) for k, v in value.items()}


def build_settings(cls: type, values: Mapping[str, Any], section: str, source: str) -> Any:
    """A backend's settings dataclass from its section: every key known and of the declared type (str, int,
    bool, Duration), then the dataclass's own ``validate()``, if it has one. Raises ConfigError naming the file,
    ``section.key`` and the reason — the same errors, and exit status 78, as batchd's own sections."""
    settings = _build_section(cls, values, section, source)
    validate = getattr(settings, "validate", None)
    if callable(validate):
        try:
            validate()
        except SettingError as e:
            raise ConfigError(source, f"{section}.{e.key}", e.reason) from None
    return settings


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
        try:
            if isinstance(value, str):
                secs = parse_duration(value)
            else:
                secs = float(value)
                check_duration(secs, value)
        except (ValueError, OverflowError) as e:
            raise ConfigError(source, key, str(e)) from None
        return Duration(secs)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_tname(value)}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {_tname(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(source, key, "must be a finite number")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_tname(value)}")
        if value > MAX_INT:
            raise ConfigError(source, key, f"{value} is too large (at most {MAX_INT})")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_tname(value)}")
        return value
    if isinstance(typ, types.UnionType):  # checked by _validate (daemon.parse_workers)
        return value
    raise AssertionError(f"unhandled config type {typ!r} for {key}")


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _validate(cfg: Config) -> None:
    src = cfg.source
    db, q, emb = cfg.database, cfg.queue, cfg.embedding

    if not db.path:
        raise ConfigError(src, "database.path", "must not be empty")
    if "\x00" in db.path:
        raise ConfigError(src, "database.path", "must not contain a NUL character")
    for key in ("chunks_table", "id_column", "text_column"):
        if not _IDENT.match(getattr(db, key)):
            raise ConfigError(src, f"database.{key}", "must be a plain SQL identifier (letters, digits, _)")
    for key in ("id_column", "text_column"):
        if getattr(db, key).lower() in BATCHD_COLUMNS:
            raise ConfigError(src, f"database.{key}", f"{getattr(db, key)!r} is one of the columns batchd adds "
                              f"to {db.chunks_table} ({', '.join(BATCHD_COLUMNS)}): name the application's own column")
    if db.text_column.lower() == db.id_column.lower():
        raise ConfigError(src, "database.text_column", f"{db.text_column!r} is also database.id_column: "
                          "the text and the id must be two columns")
    table = db.chunks_table.lower()
    if table in BATCHD_TABLES or table.startswith(("chunks_vec_", "sqlite_")):
        raise ConfigError(src, "database.chunks_table",
                          f"{db.chunks_table!r} is a table batchd or SQLite owns: name the application's table")

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

    _validate_gemini_api(cfg)

    if cfg.daemon.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(src, "daemon.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    pw = cfg.daemon.parse_workers
    if pw != "auto" and (isinstance(pw, bool) or not isinstance(pw, int) or not 0 <= pw <= MAX_PARSE_WORKERS):
        raise ConfigError(src, "daemon.parse_workers",
                          f'must be "auto" or a whole number from 0 to {MAX_PARSE_WORKERS}, got {pw!r}')

    if q.max_batch_characters < 0:
        raise ConfigError(src, "queue.max_batch_characters", "must be 0 (no limit) or more")
    _validate_money(cfg)


def _validate_money(cfg: Config) -> None:
    src, m, b, p = cfg.source, cfg.metrics, cfg.budget, cfg.pricing
    if m.listen:
        host, sep, port = m.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(src, "metrics.listen", f"{m.listen!r} is not host:port, like \"127.0.0.1:9464\"")
    if m.textfile and not m.textfile.endswith(".prom"):
        raise ConfigError(src, "metrics.textfile",
                          f"{m.textfile!r} must end in .prom (node_exporter's textfile collector reads only those)")
    for key in ("daily_usd", "monthly_usd"):
        if getattr(b, key) < 0:
            raise ConfigError(src, f"budget.{key}", "must be 0 (no limit) or more")
    if p.model:
        if p.unit not in ("1k_characters", "1m_tokens"):
            raise ConfigError(src, "pricing.unit", f"must be \"1k_characters\" or \"1m_tokens\", got {p.unit!r}")
        for key in ("batch_usd", "online_usd"):
            if getattr(p, key) < 0:
                raise ConfigError(src, f"pricing.{key}", "must be 0 or more")


def _validate_gemini_api(cfg: Config) -> None:
    """The checks that need more than the [gemini_api] section (its own are GeminiApiSettings.validate)."""
    src, emb = cfg.source, cfg.embedding
    if emb.backend == "gemini-api" and cfg.queue.max_running_jobs > GEMINI_API_SERVICE.max_concurrent_batches:
        raise ConfigError(src, "queue.max_running_jobs",
                          f"{cfg.queue.max_running_jobs} is more than the {GEMINI_API_SERVICE.max_concurrent_batches} "
                          f"concurrent batches the Gemini API allows per project")
    family = _models.family_of(emb.model)
    if emb.backend == "gemini-api" and family is _models.GEMINI and emb.dimensions > family.default_dimensions:
        raise ConfigError(src, "embedding.dimensions",
                          f"{emb.dimensions} is more than the {family.default_dimensions} dimensions {emb.model} "
                          f"produces")
