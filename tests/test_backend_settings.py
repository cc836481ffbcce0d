"""Built-in backends own their settings (issue 13 item 3): each is constructed from its own section's settings and a
small BackendContext, never the whole Config; the local model is validated by the loader (make_backend), so a
constructor never raises ConfigError; the Vertex "missing settings" lines come from one place."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from batchd.backends import BackendContext, JobState, SetupError, make_backend
from batchd.backends.gemini_api import GeminiApiBackend
from batchd.backends.gemini_api_settings import GeminiApiSettings
from batchd.backends.local import LocalBackend
from batchd.backends.local_model import LocalModel
from batchd.backends.local_settings import LocalSettings
from batchd.backends.vertex import VertexBackend
from batchd.backends.vertex_settings import VertexSettings
from batchd.config import from_dict
from tests.conftest import cli


def context(tmp_path: Path, **over: object) -> BackendContext:
    ctx = BackendContext(instance_id="inst", model="text-embedding-005", task_type="RETRIEVAL_DOCUMENT",
                         dimensions=768, database=str(tmp_path / "app.db"), source=str(tmp_path / "batchd.toml"))
    return replace(ctx, **over)


def test_each_built_in_backend_is_built_from_its_settings_and_a_context_without_a_config(tmp_path: Path) -> None:
    vx = VertexBackend(VertexSettings(project="p", staging_uri="gs://bucket/pre"), context(tmp_path))
    assert vx.input_uri(3) == "gs://bucket/pre/inst/batch-3/input.jsonl" and vx.missing_settings == ()
    assert vx.parent == "projects/p/locations/us-central1"

    gm = GeminiApiBackend(GeminiApiSettings(), context(tmp_path, model="gemini-embedding-001"))
    assert gm.work_dir == tmp_path.resolve() and gm.display_name(3) == "batchd-inst-3"

    ctx = context(tmp_path, model="all-MiniLM-L6-v2", dimensions=384)
    lc = LocalBackend(LocalSettings(), ctx, LocalModel("/models/minilm", 384))
    job = lc.submit(3, [])
    assert lc.find_job(3) == job and lc.status(job).state is JobState.SUCCEEDED
    assert (tmp_path / "local-jobs" / "inst" / "batch-3.in.jsonl").is_file()
    for backend in (vx, gm, lc):
        assert not hasattr(backend, "config"), type(backend).__name__


def test_constructing_the_local_backend_reads_no_file_and_never_raises_config_error(tmp_path: Path) -> None:
    """Before, the constructor looked the model up and raised ConfigError; now make_backend validates first."""
    ctx = context(tmp_path, model="text-embedding-005", dimensions=768)  # all three checks would refuse these
    backend = LocalBackend(LocalSettings(model="no-such-org/no-such-model"), ctx,
                           LocalModel(str(tmp_path / "nowhere"), 384))
    assert backend.model_path == str(tmp_path / "nowhere") and backend.model_dimensions == 384


def test_make_backend_hands_each_backend_its_own_section(tmp_path: Path) -> None:
    base = {"database": {"path": str(tmp_path / "app.db")}}
    cfg = from_dict({**base, "vertex": {"project": "p", "staging_uri": "gs://bkt/x"}}, source="f.toml")
    vx = make_backend(cfg, "i")
    assert isinstance(vx, VertexBackend) and vx.settings is cfg.vertex
    assert BackendContext.of(cfg, "i") == BackendContext("i", "text-embedding-005", "RETRIEVAL_DOCUMENT", 768,
                                                         str(tmp_path / "app.db"), "f.toml")
    cfg = from_dict({**base, "embedding": {"backend": "gemini-api"}})
    gm = make_backend(cfg, "i")
    assert isinstance(gm, GeminiApiBackend) and gm.settings is cfg.gemini_api
    cfg = from_dict({**base, "embedding": {"backend": "local"}, "local": {"slice_size": 7}})
    lc = make_backend(cfg, "i")
    assert isinstance(lc, LocalBackend) and lc.settings is cfg.local and lc.model_dimensions == 384


# ---------------------------------------------------------------------- the local model, validated by the loader


def local_config(tmp_path: Path, dimensions: int) -> Path:
    p = tmp_path / "batchd.toml"
    p.write_text(f'[database]\npath = "{tmp_path / "app.db"}"\n'
                 f'[embedding]\nbackend = "local"\nmodel = "all-MiniLM-L6-v2"\ndimensions = {dimensions}\n')
    return p


def test_a_local_dimensions_mismatch_exits_78_naming_the_key_from_check_and_from_run(tmp_path: Path) -> None:
    cfg = local_config(tmp_path, 768)
    reason = ("embedding.dimensions: is 768 but the local model all-MiniLM-L6-v2 makes 384-dimensional vectors; "
              "set dimensions = 384")
    r = cli("--config", str(cfg), "check")
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert r.stderr == f"batchd: config error: {cfg}: {reason}\n"
    assert "ok    backend" not in r.stdout

    r = cli("--config", str(cfg), "run", "--once")
    assert r.returncode == 78, (r.stdout, r.stderr)
    [ev] = [e for e in map(json.loads, filter(None, r.stdout.splitlines())) if e["event"] == "config.invalid"]
    assert ev["key"] == "embedding.dimensions" and ev["exit_status"] == 78 and ev["error"] == f"{cfg}: {reason}"


# ---------------------------------------------------------------------- missing Vertex settings: one place


def test_the_missing_vertex_settings_are_named_by_one_function_and_reported_the_same_everywhere(
        tmp_path: Path) -> None:
    lines = VertexSettings().missing()
    assert lines == ["vertex.project is not set (the Google Cloud project that runs the jobs)",
                     "vertex.staging_uri is not set (a gs://bucket/prefix for job input and output)"]
    backend = VertexBackend(VertexSettings(), context(tmp_path))  # construction succeeds: batches can wait
    assert backend.missing_settings == tuple(lines)
    [only] = backend.check()
    assert (only.name, only.ok, only.detail) == ("vertex settings", False, "; ".join(lines))
    with pytest.raises(SetupError) as e:  # every remote call: SetupError, so no attempt is burnt
        backend.find_job(1)
    assert str(e.value) == "; ".join(lines)

    cfg = tmp_path / "batchd.toml"
    cfg.write_text(f'[database]\npath = "{tmp_path / "app.db"}"\n[vertex]\nproject = "p"\n')
    r = cli("--config", str(cfg), "check")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[-1] == "FAIL  vertex: " + lines[1]
    assert "FAIL  vertex: " + lines[0] not in r.stdout


# ---------------------------------------------------------------------- what the backends share


def test_a_service_state_name_becomes_a_job_state_in_one_place() -> None:
    class Member:  # what the Google clients' enums look like
        name = "JOB_STATE_PARTIALLY_SUCCEEDED"

    assert JobState.named(Member(), "JOB_STATE_") is JobState.PARTIALLY_SUCCEEDED
    assert JobState.named("BATCH_STATE_RUNNING", "JOB_STATE_", "BATCH_STATE_") is JobState.RUNNING
    assert JobState.named("JOB_STATE_SOMETHING_NEW", "JOB_STATE_") is JobState.UNKNOWN
    assert JobState.named(None, "JOB_STATE_") is JobState.UNKNOWN
    assert JobState.named("SUCCEEDED") is JobState.SUCCEEDED


def test_both_services_refuse_a_first_retry_wait_longer_than_the_deadline_with_the_same_words() -> None:
    from batchd.config import ConfigError

    for section in ("vertex", "gemini_api"):
        with pytest.raises(ConfigError) as e:
            from_dict({section: {"retry_backoff": "10s", "retry_deadline": "5s"}}, source="f.toml")
        assert str(e.value) == f"f.toml: {section}.retry_backoff: 10s is longer than {section}.retry_deadline (5s)"
