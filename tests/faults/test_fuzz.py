"""Property-based fuzz (hypothesis) of the two inputs an operator hands batchd: enqueue lines and the config file.

The properties (issue 9, "the fault suite to keep"):
- enqueue: never a traceback, whatever the lines; every good line lands (the last good line of an id wins),
  every bad line is reported once with its number;
- config: loading either gives a Config whose values the daemon can use, or a ConfigError that is one line
  naming the file and a key of the document; the CLI turns it into exit status 78.

Examples are bounded (``max_examples``) so the suite stays fast on a busy 2-core machine; the random seed is
derandomised so CI is reproducible (hypothesis prints a failing example's reproduction either way).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchd.config import MAX_DURATION, MIN_DURATION, Config, ConfigError, from_dict, load
from batchd.ingest import Rejected, read_jsonl
from batchd.manager import BatchManager
from batchd.store import Store
from tests.configs import toml_str, toml_text, toml_value
from tests.conftest import MEMBACKEND, REPO, Clock, batchd_cmd
from tests.storehelp import store_chunks

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------------------ enqueue

# Explicit ids are negative (down to SQLite's minimum) and a seed row holds id 0, so SQLite's automatic ids
# for id-less lines (largest + 1) are positive and never collide with an explicit id of the same input.
ids = st.one_of(st.integers(min_value=-(2**63), max_value=-1), st.sampled_from([-1, -2, -3]))
texts = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40).filter(lambda t: t.strip())


@st.composite
def good_line(draw: Any) -> tuple[bytes, int | None, str]:
    text = draw(texts)
    cid = draw(st.one_of(st.none(), ids))
    obj: dict[str, Any] = {"text": text}
    if cid is not None:
        obj["id"] = cid
    if draw(st.booleans()):
        obj["extra"] = draw(st.integers())  # unknown fields are ignored
    return json.dumps(obj).encode(), cid, text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)

bad_line = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: b.strip() and b"\n" not in b and b"\r" not in b),
    json_values.filter(lambda v: not (isinstance(v, dict) and isinstance(v.get("text"), str)
                                      and v["text"].strip())).map(lambda v: json.dumps(v).encode()),
    # the crashers of issue 9 item 7 and their neighbours
    st.sampled_from([b'{"id": 9223372036854775808, "text": "x"}', b'{"id": -9223372036854775809, "text": "x"}',
                     b'{"id": 18446744073709551616, "text": "x"}', b'{"id": 1e400, "text": "x"}',
                     b'{"id": true, "text": "x"}', b'{"id": "1", "text": "x"}', b'{"text": "\\ud800"}',
                     b'{"text": "   "}', b'{"text": null}', b'{"id": 5}', b'\xff\xfe{"text": "x"}']),
)

line = st.one_of(good_line().map(lambda g: ("good", g)), bad_line.map(lambda b: ("bad", b)))


def _is_blank(raw: bytes) -> bool:
    return not raw.strip()


def _good(cid: int | None, text: str) -> tuple[str, Any]:
    obj = {"text": text} if cid is None else {"id": cid, "text": text}
    return "good", (json.dumps(obj).encode(), cid, text)


@FUZZ
@given(lines=st.lists(line, min_size=1, max_size=25))
# issue 9 item 1: one id re-texted three times in one slice failed the whole slice (a tombstone UNIQUE conflict)
@example(lines=[_good(None, "good"), _good(-1, "a"), _good(-1, "b"), _good(-1, "c")])
def test_enqueue_never_crashes_and_every_good_line_lands(lines: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        cfg = from_dict({"database": {"path": str(Path(folder) / "app.db")},
                         "embedding": {"backend": MEMBACKEND, "model": "test-model", "dimensions": 4}})
        store = Store.open(cfg)
        try:
            manager = BatchManager(store, _NoBackend(), cfg, clock=Clock())
            manager.enqueue(iter([(0, "seed row")]))
            data = b"\n".join(raw if kind == "bad" else raw[0] for kind, raw in lines) + b"\n"
            rejected: list[Rejected] = []
            manager.enqueue(read_jsonl(io.BytesIO(data), rejected.append))

            bad_numbers = [n for n, (kind, raw) in enumerate(lines, start=1)
                           if kind == "bad" and not _is_blank(raw)]
            assert [r.line for r in rejected] == bad_numbers
            assert all(r.reason and "\n" not in r.reason for r in rejected)
            rows = {c["id"]: c["text"] for c in store_chunks(store)}
            last_by_id: dict[int, str] = {}
            anonymous: list[str] = []
            for kind, raw in lines:
                if kind == "good":
                    _, cid, text = raw
                    if cid is None:
                        anonymous.append(text)
                    else:
                        last_by_id[cid] = text
            for cid, text in last_by_id.items():
                assert rows.get(cid) == text
            positive = sorted((cid, text) for cid, text in rows.items() if cid > 0)
            assert [text for _, text in positive] == anonymous
            assert len(rows) == 1 + len(last_by_id) + len(anonymous)
        finally:
            store.close()


class _NoBackend:
    """enqueue never reaches the backend; anything else would be a bug in this test."""


def test_enqueue_cli_rejects_a_huge_id_and_keeps_the_good_lines(tmp_path: Path, batchd_env: dict[str, str]) -> None:
    """Issue 9 item 7: an id >= 2^63 was an OverflowError traceback and the whole slice was lost."""
    cfg = _cli_config(tmp_path)
    data = b'{"text": "good"}\n{"id": 9223372036854775808, "text": "x"}\n{"id": 7, "text": "also good"}\n'
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "enqueue", "-"], input=data, capture_output=True,
                       env=batchd_env, timeout=120)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 1, out + err
    assert out.strip() == "inserted=2 requeued=0 unchanged=0 rejected=1"
    assert err.strip() == ('batchd: enqueue: <stdin>:2: "id" is out of range (SQLite ids are 64-bit signed '
                           "integers); line skipped")
    store = Store.open(load(cfg))
    try:
        assert [(c["id"], c["text"]) for c in store_chunks(store)] == [(1, "good"), (7, "also good")]
    finally:
        store.close()


def _cli_config(folder: Path, extra: str = "") -> Path:
    p = folder / "batchd.toml"
    p.write_text(f'[database]\npath = "{folder / "app.db"}"\n'
                 f'[embedding]\nbackend = "{MEMBACKEND}"\nmodel = "test-model"\ndimensions = 8\n{extra}')
    return p


# ------------------------------------------------------------------------------------------------ config

SHIPPED = tomllib.loads((REPO / "etc" / "batchd.toml").read_text())
KEYS = [(section, key) for section, table in SHIPPED.items() for key in table]
# A mutated key may also be reported through the key it is checked against.
RELATED = {
    "queue.max_batch_size": {"queue.min_batch_size"},
    "queue.min_batch_size": {"queue.max_batch_size"},
    "embedding.model": {"queue.max_batch_size"},
    "embedding.backend": {"queue.max_batch_size"},
    "vertex.retry_deadline": {"vertex.retry_backoff"},
    "database.id_column": {"database.text_column"},
}

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=20),
    st.from_regex(r"\A-?[0-9]{1,25}(\.[0-9]{1,12})?(ms|s|m|h|d)\Z"),
    st.sampled_from(["", "0s", "0.0000001ms", "100000000000000000000d", "inf", "nan", "-1s", "gs://", "gs://b/p",
                     "embedding_status", "content_hash", "id", "chunks_vec", "batch_jobs", "local", "vertex",
                     "a\x00b", "a\nb", "http://127.0.0.1:9", "0s:80", "x" * 300]),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3),
                        st.dictionaries(st.sampled_from(["a", "path"]), toml_scalars, max_size=2))


def check_usable(cfg: Config) -> None:
    """What the daemon and store do with a loaded config must not be able to crash on its values."""
    for section in (cfg.queue, cfg.vertex):
        for name, value in vars(section).items():
            if isinstance(value, float):
                assert MIN_DURATION <= value <= MAX_DURATION, name
                dt.timedelta(seconds=value)  # the scheduler's interval
            elif isinstance(value, int) and not isinstance(value, bool):
                assert value < 2**63, name  # bound as an SQLite parameter
    assert "\x00" not in cfg.database.path


@FUZZ
@given(picks=st.lists(st.tuples(st.sampled_from(KEYS), toml_values), min_size=1, max_size=3))
def test_mutated_shipped_config_loads_or_names_the_key(picks: list[tuple[tuple[str, str], Any]]) -> None:
    """Mutate 1-3 keys of etc/batchd.toml: either it loads to usable values, or the error names one of them."""
    doc = {section: dict(table) for section, table in SHIPPED.items()}
    mutated = set()
    for (section, key), value in picks:
        doc[section][key] = value
        mutated.add(f"{section}.{key}")
    text = toml_text(doc)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "batchd.toml"
        path.write_text(text, encoding="utf-8")
        try:
            cfg = load(path)
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"{path}: ")
            allowed = mutated | {r for m in mutated for r in RELATED.get(m, ())}
            assert e.key in allowed, (msg, mutated)
        else:
            check_usable(cfg)


@FUZZ
@given(doc=st.dictionaries(
    st.one_of(st.sampled_from(list(SHIPPED)), st.text(min_size=1, max_size=8)),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from([k for _, k in KEYS]), st.text(min_size=1, max_size=8)),
                              toml_values, max_size=4), toml_scalars),
    max_size=4))
def test_random_config_documents_load_or_name_the_key(doc: dict[str, Any]) -> None:
    """Arbitrary sections and keys (known and unknown): a usable Config or one line naming a key present."""
    lines = []
    for section, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_str(section)}]")
            lines.extend(f"{toml_str(k)} = {toml_value(v)}" for k, v in table.items())
        else:
            lines.insert(0, f"{toml_str(section)} = {toml_value(table)}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "batchd.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            cfg = load(path)
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"{path}: ")
            present = set(doc) | {f"{s}.{k}" for s, t in doc.items() if isinstance(t, dict) for k in t}
            # cross-key checks may name a key left at its default
            assert e.key in present or e.key in {"queue.min_batch_size", "queue.max_batch_size",
                                                 "vertex.retry_backoff", "database.text_column"}, msg
        else:
            check_usable(cfg)


@pytest.mark.parametrize("mutation", [
    ('text_column = "content"', 'text_column = "attempts"', "database.text_column"),
])
def test_cli_exits_78_naming_the_key(tmp_path: Path, batchd_env: dict[str, str], mutation: tuple[str, str, str]):
    old, new, key = mutation
    text = (REPO / "etc" / "batchd.toml").read_text()
    assert old in text
    p = tmp_path / "batchd.toml"
    p.write_text(text.replace(old, new))
    r = subprocess.run([*batchd_cmd(), "--config", str(p), "stats"], capture_output=True, text=True,
                       env=batchd_env, timeout=60)
    assert r.returncode == 78 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"batchd: config error: {p}: {key}: ")
