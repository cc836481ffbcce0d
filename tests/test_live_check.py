"""`batchd check --live` against the fake Vertex in every quirk mode of issue 10: it passes on the quirks batchd
accepts and fails, with a line saying what was expected and what came, on the ones it cannot. In-process through
click's CliRunner (the real aiplatform/storage clients over HTTP to the fakes); Ctrl-C as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchd.cli import main
from batchd.config import load
from batchd.store import Store
from tests.configs import merge, write_config
from tests.conftest import batchd_cmd
from tests.fakes.vertex_env import BUCKET, LOCATION, fake_vertex, gcs, vertex_sections
from tests.storehelp import store_chunks


def cli_config(tmp_path: Path, endpoint: str, model: str = "text-embedding-005", location: str = LOCATION) -> Path:
    sections = merge(vertex_sections(tmp_path, endpoint, folder="live", location=location),
                     {"embedding": {"model": model}})
    path = write_config(tmp_path / "batchd.toml", sections)
    Store.open(load(path)).close()  # the database exists: `batchd check` reports a missing one and creates nothing
    return path


def live(cfg: Path, *args: str) -> tuple[int, list[str]]:
    r = CliRunner().invoke(main, ["--config", str(cfg), "check", "--live", "--poll", "50ms", *args])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output.splitlines()


def line(out: list[str], start: str) -> str:
    found = [ln for ln in out if ln.startswith(start)]
    assert found, f"no line starting {start!r} in:\n" + "\n".join(out)
    return found[0]


def staged(gcs, cfg: Path) -> list[str]:
    store = Store.open(load(cfg))
    try:
        return gcs.names(BUCKET, f"live/{store.instance_id}/batch-0/")
    finally:
        store.close()


def nothing_written(cfg: Path) -> None:
    store = Store.open(load(cfg))
    try:
        assert store_chunks(store) == [] and store.batches() == []
    finally:
        store.close()


# ---------------------------------------------------------------------- quirks batchd accepts: exit 0


@pytest.mark.parametrize("model, switches, expect", [
    ("text-embedding-005", {}, "ok    vector length: 8 values, as asked"),
    ("text-embedding-005", {"split": 3, "incremental": True}, "ok    output files: predictions_0001.jsonl, "),
    ("text-embedding-005", {"echo_task": "lower", "singular_prediction": True}, "ok    each line parsed: 3 lines"),
    ("gemini-embedding-001", {"gemini_parent": True, "token_count_string": True},
     "ok    vector length: answered 3072 values for 8 asked: cut to the first 8 and renormalised"),
    ("gemini-embedding-001", {"token_count_string": True}, "ok    unit length: every stored vector has norm 1"),
])
def test_live_check_passes_on_what_batchd_accepts(tmp_path: Path, fake_vertex, gcs, model: str, switches: dict,
                                                   expect: str) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url, model)
    fake_vertex.auto_finish = True
    for k, v in switches.items():
        setattr(fake_vertex, k, v)
    code, out = live(cfg)
    assert code == 0, "\n".join(out)
    line(out, expect)
    line(out, "ok    input accepted: 3 lines")
    line(out, "ok    job finished: SUCCEEDED")
    line(out, "ok    token counts: ")
    line(out, "ok    job counts: succeeded=3, failed=0")
    line(out, "ok    cleaned up")
    line(out, "note  to look at: UNCONFIRMED")
    assert not [ln for ln in out if ln.startswith("FAIL")]
    assert staged(gcs, cfg) == []
    nothing_written(cfg)


def test_live_check_waits_through_a_pause_and_keeps_files_when_asked(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url)
    fake_vertex.auto_finish = True
    fake_vertex.hold = "PAUSED"
    threading.Timer(1.0, lambda: setattr(fake_vertex, "hold", None)).start()
    code, out = live(cfg, "--keep")
    assert code == 0, "\n".join(out)
    assert [fake_vertex.state(n) for n in fake_vertex.job_names()] == ["SUCCEEDED"]
    line(out, "note  files kept")
    names = staged(gcs, cfg)
    assert any(n.endswith("input.jsonl") for n in names) and any(n.endswith("predictions.jsonl") for n in names)
    # the next run starts from a clean slate (an old input is never reused) and cleans up
    code, out = live(cfg)
    assert code == 0 and staged(gcs, cfg) == []


def test_live_check_warns_about_a_region_without_gemini_batch(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url, "gemini-embedding-001", location="asia-south1")
    r = CliRunner().invoke(main, ["--config", str(cfg), "check"])
    assert r.exit_code == 0, r.output
    assert "warn  vertex region: vertex.location = 'asia-south1'" in r.output and "us-central1" in r.output


# ---------------------------------------------------------------------- quirks it cannot accept: exit 1


@pytest.mark.parametrize("switches, expect", [
    ({"final_state": "FAILED", "export_fraction": 0.67},
     ["FAIL  job finished: expected SUCCEEDED; the job ended FAILED: fake: the job failed",
      "FAIL  each line parsed: expected 3 lines, each with a vector; got 2 lines: no line at all for text(s) 3"]),
    ({"mangle_echo": str.upper}, ["FAIL  each line parsed: expected 3 lines, each with a vector; got 3 lines: "
                                  "a line for a text that was not sent"]),
    ({"output_dims": 7}, ["FAIL  each line parsed: expected 3 lines, each with a vector; got 3 lines: "
                          "text 1 failed: vector has 7 dimensions, expected 8"]),
    ({"truncate": lambda text: True}, ["FAIL  not truncated: expected 3 short texts to fit the model's input; "
                                       "3 truncated"]),
    ({"drop": lambda text: text.startswith("Ein")}, ["FAIL  each line parsed: expected 3 lines, each with a vector; "
                                                     "got 2 lines: no line at all for text(s) 2",
                                                     "FAIL  job counts: expected succeeded=3; succeeded=2"]),
    ({"fail": lambda text: "fake: blocked" if text.startswith("Un") else None, "error_shape": "status_only"},
     ["FAIL  each line parsed: expected 3 lines, each with a vector; got 3 lines: text 3 failed: fake: blocked"]),
])
def test_live_check_fails_with_clear_lines(tmp_path: Path, fake_vertex, gcs, switches: dict, expect: list[str]) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url)
    fake_vertex.auto_finish = True
    for k, v in switches.items():
        setattr(fake_vertex, k, v)
    code, out = live(cfg)
    assert code == 1, "\n".join(out)
    for e in expect:
        line(out, e)
    line(out, "ok    cleaned up")
    assert staged(gcs, cfg) == []
    nothing_written(cfg)


def test_gemini_without_token_counts_fails(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url, "gemini-embedding-001")
    fake_vertex.auto_finish = True
    code, out = live(cfg)
    assert code == 1
    line(out, "FAIL  token counts: expected a token count on every line (statistics.token_count or "
              "response.tokenCount); 3 of 3 had none")


def test_live_check_timeout_cancels_and_cleans(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url)
    code, out = live(cfg, "--timeout", "1s")
    assert code == 1
    line(out, "FAIL  job finished: expected the job to end within 1s; it did not (cancelled)")
    assert [fake_vertex.state(n) for n in fake_vertex.job_names()] == ["CANCELLED"]
    assert staged(gcs, cfg) == []


def test_ctrl_c_cancels_the_job_and_deletes_its_files(tmp_path: Path, fake_vertex, gcs) -> None:
    cfg = cli_config(tmp_path, fake_vertex.url)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs.url)
    # SIGINT back to its default in the child: a shell without job control starts background commands (a CI
    # runner's `cmd &`) with SIGINT ignored, the ignore is inherited across exec, and Python then installs no
    # KeyboardInterrupt handler — Ctrl-C would never reach batchd (the test hung 60 s in such a run).
    proc = subprocess.Popen([*batchd_cmd(), "--config", str(cfg), "check", "--live", "--poll", "100ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not fake_vertex.job_names() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fake_vertex.job_names(), "the live job was never created"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "FAIL  interrupted: job " in out and "Traceback" not in out + err
    assert [fake_vertex.state(n) for n in fake_vertex.job_names()] == ["CANCELLED"]
    assert staged(gcs, cfg) == []

