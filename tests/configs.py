"""batchd.toml files for tests: one writer (sections as dicts, rendered as TOML), the file-backed test backend's
``[embedding]`` section, and the check that a bad file is refused with one line naming the file, key and reason.

In-process tests build a Config with ``make_config`` (tests/conftest.py) instead; these are for the tests that
run batchd as a command (a subprocess, click's CliRunner, systemd) and so need a file.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest

from batchd.config import ConfigError, load

MEMBACKEND = "tests.fakes.membackend:ScriptedBackend"
MEMBACKEND_EMBEDDING = {"backend": MEMBACKEND, "model": "test-model", "dimensions": 16}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s sections merged key by key (a copy: neither argument changes)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out


def write_config(path: Path, sections: dict[str, dict[str, Any]], extra: str = "") -> Path:
    """Write ``sections`` ({"queue": {"max_batch_size": 20}, ...}) as TOML at ``path``, then ``extra`` (TOML
    text, as is: for what a dict cannot say, such as a misspelt key); return ``path``."""
    path.write_text(toml_text(sections) + extra)
    return path


def daemon_config(folder: Path, *, flush: str = "0.5s", sync: str = "0.5s", min_batch_size: int = 1,
                  **sections: dict[str, Any]) -> Path:
    """``folder``/batchd.toml for a `batchd run` on the file-backed test backend: ``folder``/app.db, batches of
    up to 5,000 flushed and synced every ``flush`` / ``sync``; ``sections`` are merged over that."""
    base = {"database": {"path": folder / "app.db"},
            "queue": {"min_batch_size": min_batch_size, "max_batch_size": 5000, "flush_interval": flush,
                      "sync_interval": sync},
            "embedding": MEMBACKEND_EMBEDDING}
    return write_config(folder / "batchd.toml", merge(base, sections))


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """``[section]`` tables of ``key = value`` lines, in the order given."""
    return "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
                   for name, table in sections.items())


def toml_value(v: Any) -> str:
    """A tiny TOML writer for what tests put in a config (the stdlib reads TOML but does not write it): booleans,
    numbers (nan and inf too), strings and paths, datetimes, lists and inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str | Path):
        return toml_str(str(v))
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_str(s: str) -> str:
    """A TOML basic string: quote and backslash escaped, control characters as \\uXXXX, the rest as is."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def assert_refused(tmp_path: Path, text: str, key: str, reason: str) -> None:
    """``text`` as a batchd.toml does not load: one line, ``<file>: <key>: <reason...>`` (the key as printed,
    non-printable characters escaped)."""
    p = tmp_path / "batchd.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: {key}: "), msg
    assert reason in msg.removeprefix(f"{p}: {key}: "), msg
    assert "\n" not in msg
