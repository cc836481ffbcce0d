"""The batchd command on the gemini-api backend against the fake Gemini API: check, enqueue and search (the
online embedding of the query) through click's CliRunner, and run --until-idle (batches finish when polled) as
a real subprocess — with the key given the way systemd's LoadCredential= gives it, and never printed or logged.
(One subprocess only: each one pays google-genai's import, seconds on a loaded 2-core machine.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from click.testing import CliRunner

from batchd.cli import main
from batchd.config import load
from batchd.store import Store
from tests.configs import merge, write_config
from tests.conftest import batchd_cmd
from tests.fakes.fake_gemini_api import API_KEY, decode, expected_values
from tests.fakes.gemini_env import fake_gemini, gemini_sections
from tests.storehelp import store_chunks, store_vector


def cli_config(tmp_path: Path, base_url: str) -> Path:
    path = write_config(tmp_path / "batchd.toml", merge(gemini_sections(tmp_path, base_url),
                                                        {"queue": {"min_batch_size": 1, "max_batch_size": 20}}))
    Store.open(load(path)).close()  # the database exists: `batchd check` reports a missing one, creates nothing
    return path


def _env(config: Path, creds: Path | None) -> dict[str, str | None]:
    env: dict[str, str | None] = {"GEMINI_API_KEY": None, "GOOGLE_API_KEY": None, "BATCHD_CONFIG": str(config),
                                  "CREDENTIALS_DIRECTORY": str(creds) if creds else None}
    return env


def batchd(config: Path, creds: Path | None, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """In process, through click's CliRunner: (exit status, stdout, stderr)."""
    r = CliRunner().invoke(main, list(args), input=stdin, env=_env(config, creds))
    out, err = r.stdout, r.stderr
    assert API_KEY not in out + err
    assert "Traceback" not in out + err and (r.exception is None or isinstance(r.exception, SystemExit)), r.exception
    return r.exit_code, out, err


def batchd_process(config: Path, creds: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in {**os.environ, **_env(config, creds)}.items() if v is not None}
    r = subprocess.run([*batchd_cmd(), *args], capture_output=True, text=True, env=env, timeout=180)
    assert API_KEY not in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return r


def test_cli_on_gemini_api(tmp_path: Path, fake_gemini) -> None:
    cfg = cli_config(tmp_path, fake_gemini.url)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "gemini-api-key").write_text(API_KEY + "\n")

    code, out, _ = batchd(cfg, None, "check")
    assert code == 1
    assert "FAIL  gemini api key: no Gemini API key" in out

    code, out, err = batchd(cfg, creds, "check")
    assert code == 0, out + err
    assert "ok    gemini api key: read from systemd credential gemini-api-key" in out
    assert f"ok    gemini api batches: listed batches at {fake_gemini.url}" in out

    texts = [f"manual page {i}" for i in range(50)]
    code, out, err = batchd(cfg, creds, "enqueue", stdin="".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert code == 0, err

    fake_gemini.auto_finish = True
    r = batchd_process(cfg, creds, "run", "--until-idle", "--poll", "50ms")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(fake_gemini.ours()) == 3  # 50 chunks at max_batch_size 20
    assert fake_gemini.sent_again_after_answer == 0

    store = Store.open(load(cfg))
    try:
        rows = store_chunks(store)
        assert [r["embedding_status"] for r in rows] == ["READY"] * 50
        for row in rows:
            got, want = decode(store_vector(store, row["id"])), expected_values(row["text"], 8)
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-6
    finally:
        store.close()

    code, out, err = batchd(cfg, creds, "search", "manual page 7", "-k", "1", "--json")
    assert code == 0, err
    [hit] = [json.loads(line) for line in out.splitlines()]
    assert hit["text"] == "manual page 7" and hit["distance"] < 1e-5
    assert fake_gemini.count("embed") == 1


def test_check_names_what_fails(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path, "http://127.0.0.1:9")  # nothing listens there
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "gemini-api-key").write_text(API_KEY)
    code, out, _ = batchd(cfg, creds, "check")
    assert code == 1
    assert "ok    gemini api key: read from systemd credential gemini-api-key" in out
    assert "FAIL  gemini api batches: listing batches at http://127.0.0.1:9 failed" in out


def test_check_live_runs_a_three_text_batch_end_to_end(tmp_path: Path, fake_gemini) -> None:
    cfg = cli_config(tmp_path, fake_gemini.url)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "gemini-api-key").write_text(API_KEY)
    fake_gemini.auto_finish = True
    fake_gemini.add_foreign_batch("batchd-live-check-of-another-app")
    code, out, err = batchd(cfg, creds, "check", "--live", "--poll", "50ms")
    assert code == 0, out + err
    for name in ("input accepted", "job finished", "output files", "each line parsed", "vector length",
                 "unit length", "token counts", "job counts", "cleaned up"):
        assert any(ln.startswith(f"ok    {name}") for ln in out.splitlines()), (name, out)
    [batch] = fake_gemini.ours()
    assert batch.deleted and fake_gemini.files == {}  # the input, the result file and the batch are gone
    assert fake_gemini.texts_sent == 3

    fake_gemini.token_count = None  # a quirk it reports: no token count on the lines
    code, out, _ = batchd(cfg, creds, "check", "--live", "--poll", "50ms")
    assert code == 1 and "FAIL  token counts" in out
    assert all(b.deleted for b in fake_gemini.ours()) and fake_gemini.files == {}
    assert [b.state for b in fake_gemini.batches.values() if b.foreign] == ["RUNNING"]
