"""Configuration: every key validated, errors name file + key + reason, the CLI exits 78 on one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from batchd.config import ConfigError, load, parse_duration
from tests.configs import assert_refused
from tests.conftest import REPO, batchd_cmd


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "batchd.toml"
    p.write_text(text)
    return p


def test_shipped_config_loads_with_every_default():
    cfg = load(REPO / "etc" / "batchd.toml")
    assert cfg.queue.sync_interval == 300 and cfg.queue.max_wait == 1800 and cfg.queue.job_timeout == 48 * 3600
    assert cfg.embedding.model == "text-embedding-005" and cfg.embedding.dimensions == 768
    assert cfg.database.chunks_table == "chunks" and cfg.database.text_column == "content"


def test_shipped_config_documents_every_key():
    """The commented etc/batchd.toml is the reference: every dataclass field appears in it."""
    import dataclasses

    from batchd import config as c

    text = (REPO / "etc" / "batchd.toml").read_text()
    assert "\n# [plugin.<name>]" in text  # plugin backends' own sections are documented, not listed
    for section in dataclasses.fields(c.Config):
        if section.name in ("source", "plugin"):
            continue
        assert f"[{section.name}]" in text
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            # Keys whose default depends on the backend are shown commented out (see the next test).
            commented = f"{section.name}.{f.name}" in c.BACKEND_DEFAULTS["vertex"]
            shown = f"\n# {f.name} = " if commented else f"\n{f.name} = "
            assert shown in text, f"{section.name}.{f.name} missing from etc/batchd.toml (as {shown.strip()!r})"


def test_shipped_config_shows_backend_dependent_keys_commented_out_with_every_default(tmp_path):
    """An operator who copies etc/batchd.toml and changes only the backend gets that backend's defaults."""
    from batchd.config import BACKEND_DEFAULTS

    text = (REPO / "etc" / "batchd.toml").read_text()
    lines = text.splitlines()
    keys = set(BACKEND_DEFAULTS["vertex"])
    assert all(set(row) == keys for row in BACKEND_DEFAULTS.values())
    for dotted in keys:
        name = dotted.split(".")[1]
        at = lines.index(next(line for line in lines if line.startswith(f"# {name} = ")))
        comment = " ".join(lines[max(0, at - 4):at])
        for backend, row in BACKEND_DEFAULTS.items():
            value = row[dotted]
            shown = f'"{value}"' if isinstance(value, str) else str(value)
            assert backend in comment and shown in comment, f"{dotted}: {backend}'s default {shown} not in {comment!r}"
    local = load(write(tmp_path, text.replace('backend = "vertex"', 'backend = "local"')))
    assert (local.embedding.model, local.embedding.dimensions) == ("all-MiniLM-L6-v2", 384)
    assert local.queue.min_batch_size == 1 and local.queue.sync_interval == 5 and local.queue.flush_interval == 5
    assert local.queue.max_wait == 5


@pytest.mark.parametrize("body, model, dims", [
    ('[embedding]\nbackend = "local"\n', "all-MiniLM-L6-v2", 384),
    ('[embedding]\nbackend = "local"\ndimensions = 384\n', "all-MiniLM-L6-v2", 384),
    ('[embedding]\nbackend = "local"\n[local]\nmodel = "/opt/models/bge-small-en-v1.5"\n', "bge-small-en-v1.5", 384),
    ('[embedding]\nbackend = "vertex"\n', "text-embedding-005", 768),
    ('[embedding]\nmodel = "gemini-embedding-001"\ndimensions = 3072\n', "gemini-embedding-001", 3072),
])
def test_defaults_depend_on_the_backend(tmp_path, body, model, dims):
    cfg = load(write(tmp_path, body))
    assert (cfg.embedding.model, cfg.embedding.dimensions) == (model, dims)
    local = cfg.embedding.backend == "local"
    assert cfg.queue.min_batch_size == (1 if local else 100)
    assert (cfg.queue.max_wait, cfg.queue.sync_interval) == ((5, 5) if local else (1800, 300))


def test_what_the_operator_sets_wins_over_the_backend_defaults(tmp_path):
    cfg = load(write(tmp_path, '[embedding]\nbackend = "local"\n[queue]\nmin_batch_size = 50\nsync_interval = "1m"\n'))
    assert cfg.queue.min_batch_size == 50 and cfg.queue.sync_interval == 60 and cfg.queue.max_wait == 5


@pytest.mark.parametrize(
    "body, key, reason",
    [
        ("[queue]\nmin_batch_sise = 5\n", "queue.min_batch_sise", "unknown key"),
        ("[quue]\n", "quue", "unknown section"),
        ("[queue]\nmax_attempts = \"3\"\n", "queue.max_attempts", "expected an integer, got a string"),
        ("[queue]\nmax_wait = \"30 minutes\"\n", "queue.max_wait", "is not a duration"),
        ("[queue]\nsync_interval = \"0s\"\n", "queue.sync_interval", "greater than zero"),
        ("[vertex]\nstaging_uri = \"s3://bucket/prefix\"\n", "vertex.staging_uri", "is not a gs://bucket/prefix URI"),
        ("[vertex]\nstaging_uri = \"gs://\"\n", "vertex.staging_uri", "is not a gs://bucket/prefix URI"),
        ("[queue]\nmin_batch_size = 500\nmax_batch_size = 100\n", "queue.min_batch_size", "greater than"),
        ("[embedding]\ndimensions = 0\n", "embedding.dimensions", "greater than zero"),
        ("[embedding]\ntask_type = \"SEARCH\"\n", "embedding.task_type", "must be one of"),
        ("[embedding]\nbackend = \"openai\"\n", "embedding.backend", "must be"),
        ("[queue]\nmax_batch_size = 50000\n", "queue.max_batch_size", "exceeds the 30000 rows"),
        ("[vertex]\ncleanup = \"yes\"\n", "vertex.cleanup", "expected true or false"),
        ("[database]\nchunks_table = \"chunks; drop\"\n", "database.chunks_table", "plain SQL identifier"),
        ("[daemon]\nlog_level = \"loud\"\n", "daemon.log_level", "must be one of"),
        ("queue = 3\n", "queue", "must be a table"),
        # issue 9 item 7: input that used to pass and crash later, or was nonsense accepted
        ("[database]\ntext_column = \"embedding_status\"\n", "database.text_column", "columns batchd adds"),
        ("[database]\ntext_column = \"Content_Hash\"\n", "database.text_column", "columns batchd adds"),
        ("[database]\nid_column = \"batch_job_id\"\n", "database.id_column", "columns batchd adds"),
        ("[database]\ntext_column = \"id\"\n", "database.text_column", "also database.id_column"),
        ("[database]\nchunks_table = \"batch_jobs\"\n", "database.chunks_table", "batchd or SQLite owns"),
        ("[database]\npath = \"/tmp/a\\u0000b.db\"\n", "database.path", "NUL character"),
        ("[queue]\nsync_interval = \"100000000000000000000d\"\n", "queue.sync_interval", "longer than 365d"),
        ("[queue]\nmax_wait = 1e300\n", "queue.max_wait", "longer than 365d"),
        ("[queue]\nflush_interval = inf\n", "queue.flush_interval", "not a finite duration"),
        ("[queue]\nflush_interval = nan\n", "queue.flush_interval", "not a finite duration"),
        ("[queue]\njob_timeout = \"0.0000001ms\"\n", "queue.job_timeout", "shorter than 1ms"),
        ("[queue]\nmax_attempts = 9223372036854775807\n", "queue.max_attempts", "too large"),
        ("[vertex]\napi_endpoint = \"0s\"\n", "vertex.api_endpoint", "is not a host[:port]"),
        ("[vertex]\napi_endpoint = \"http://127.0.0.1:70000\"\n", "vertex.api_endpoint", "is not a host[:port]"),
        ("[queue]\n\"max\\nwait\" = 3\n", "queue.max\\nwait", "unknown key"),
    ],
)
def test_bad_values_name_the_file_key_and_reason(tmp_path, body, key, reason):
    assert_refused(tmp_path, body, key, reason)


@pytest.mark.parametrize("endpoint", ["localhost:8080", "http://127.0.0.1:9", "https://[::1]:8443",
                                      "europe-west4-aiplatform.googleapis.com", "fake-vertex:8080"])
def test_real_endpoints_are_accepted(tmp_path, endpoint):
    assert load(write(tmp_path, f"[vertex]\napi_endpoint = \"{endpoint}\"\n")).vertex.api_endpoint == endpoint


def test_batchd_owned_names_match_the_store():
    """The names config refuses for the app's columns and table are exactly the ones the migrations create."""
    from batchd import config
    from batchd.store import schema

    assert {name for name, _ in schema.OWN_CHUNK_COLUMNS} == set(config.BATCHD_COLUMNS)
    assert set(schema.OWN_TABLES) == set(config.BATCHD_TABLES)


def test_gemini_allows_big_batches(tmp_path):
    cfg = load(write(tmp_path, "[embedding]\nmodel = \"gemini-embedding-001\"\n[queue]\nmax_batch_size = 200000\n"))
    assert cfg.embedding.family == "gemini" and cfg.queue.max_batch_size == 200_000


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(write(tmp_path, "[queue\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")


def test_durations():
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration("24h") == 86400
    assert parse_duration("500ms") == 0.5 and parse_duration("2d") == 172800
    with pytest.raises(ValueError):
        parse_duration("5 minutes")
    assert parse_duration("1ms") == 0.001 and parse_duration("365d") == 365 * 86400
    for absurd in ("0.0000001ms", "366d", "100000000000000000000d"):
        with pytest.raises(ValueError):
            parse_duration(absurd)


@pytest.mark.parametrize("body, key", [
    ("[database]\npath = \"/tmp/a\\u0000b.db\"\n", "database.path"),
    ("[queue]\nsync_interval = \"100000000000000000000d\"\n", "queue.sync_interval"),
])
def test_run_exits_78_on_what_used_to_crash_it(tmp_path, batchd_env, body, key):
    """`run` loads the config itself (its error is a log event on stdout for the journal): exit 78, one line,
    no traceback, for the inputs that used to give ValueError/OverflowError tracebacks (exit 1)."""
    import json

    p = write(tmp_path, body)
    r = subprocess.run([*batchd_cmd(), "--config", str(p), "run", "--once"], capture_output=True, text=True,
                       env=batchd_env, timeout=60)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    (line,) = r.stdout.strip().splitlines()
    event = json.loads(line)
    assert event["event"] == "config.invalid" and f": {key}: " in event["error"]


@pytest.mark.parametrize("command", [["stats"], ["check"], ["flush"], ["enqueue", "/dev/null"]])
def test_cli_exits_78_with_one_line(tmp_path, batchd_env, command):
    p = write(tmp_path, "[queue]\nmax_wait = \"soon\"\n")
    r = subprocess.run([*batchd_cmd(), "--config", str(p), *command], capture_output=True, text=True,
                       env=batchd_env, timeout=60)
    assert r.returncode == 78
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"batchd: config error: {p}: queue.max_wait: 'soon' is not a duration like '30s', '5m' or '24h'"


def test_config_path_from_environment(tmp_path, batchd_env):
    p = write(tmp_path, f"[database]\npath = \"{tmp_path / 'x.db'}\"\n[embedding]\nbackend = \"local\"\n")
    batchd_env["BATCHD_CONFIG"] = str(p)
    r = subprocess.run([*batchd_cmd(), "stats", "--json"], capture_output=True, text=True, env=batchd_env,
                       timeout=60)
    # The configured database was looked for (and, stats being a read, not created).
    assert r.returncode == 1
    assert r.stderr.startswith(f"batchd: database {tmp_path / 'x.db'} does not exist"), r.stderr
    assert not (tmp_path / "x.db").exists()


def test_a_plugin_backend_owns_its_section(tmp_path):
    """[plugin.<name>] is built and validated by the plugin's own settings class: errors name the file, the key
    and the reason, and the CLI exits 78 on one line, as for batchd's own sections."""
    from tests.conftest import MEMBACKEND, cli

    base = f'[database]\npath = "{tmp_path / "app.db"}"\n[embedding]\nbackend = "{MEMBACKEND}"\nmodel = "m"\n' \
           'dimensions = 8\n'
    for section, error in [
        ('[plugin.scripted]\nfolder = "jobs"\n', "plugin.scripted.folder: 'jobs' is not an absolute path"),
        ('[plugin.scripted]\nfoldr = "/x"\n', "plugin.scripted.foldr: unknown key (expected one of: folder)"),
        ('[plugin.scripted]\nfolder = 3\n', "plugin.scripted.folder: expected a string, got an integer"),
        ("[plugin]\nscripted = 1\n", "plugin: must hold tables named after their backend, like [plugin.mybackend]"),
    ]:
        p = write(tmp_path, base + section)
        r = cli("--config", str(p), "check")
        assert r.returncode == 78, (section, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines()[-1] == f"batchd: config error: {p}: {error}"

    jobs = tmp_path / "elsewhere"
    p = write(tmp_path, base + f'[plugin.scripted]\nfolder = "{jobs}"\n')
    assert cli("--config", str(p), "enqueue", input='{"text": "x"}\n').returncode == 0
    assert cli("--config", str(p), "flush", "--force").returncode == 0
    assert len(list(jobs.glob("job-1-*.json"))) == 1


@pytest.mark.parametrize("value, ok", [("auto", True), (0, True), (2, True), (16, True), (17, False), (-1, False),
                                       ("two", False), (True, False), (1.5, False)])
def test_parse_workers_is_auto_or_a_small_whole_number(tmp_path, value, ok) -> None:
    from batchd.config import ConfigError, from_dict

    data = {"database": {"path": str(tmp_path / "a.db")}, "embedding": {"backend": "local", "dimensions": 384},
            "daemon": {"parse_workers": value}}
    if ok:
        assert from_dict(data, source="f.toml").daemon.parse_workers == value
    else:
        with pytest.raises(ConfigError, match=r"f.toml: daemon.parse_workers: must be \"auto\" or a whole number"):
            from_dict(data, source="f.toml")
