"""`batchd demo` runs to completion through the real console script, and its database answers `batchd search`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from batchd.config import load
from batchd.demo import corpus_chunks, run_demo, split_markdown, split_toml_comments
from batchd.store import Store
from tests.conftest import batchd_cmd


def test_corpus_is_a_few_hundred_chunks_of_real_text() -> None:
    chunks = corpus_chunks()
    assert 200 <= len(chunks) <= 1000
    assert all(4 <= len(c.split()) <= 200 for c in chunks)
    assert corpus_chunks() == chunks  # stable order: ids are positions, so a rerun changes nothing


def test_markdown_splitting() -> None:
    md = ("# Title\n\nA first paragraph with enough words. It goes on.\n\n"
          "- item one has several words\n- item two has several words\n  continued here\n\n"
          "```\ncode is skipped entirely\n```\n\n| a | b |\n|---|---|\n| cell one here | cell two |\n")
    assert list(split_markdown(md)) == [
        "A first paragraph with enough words. It goes on.",
        "item one has several words",
        "item two has several words continued here",
        "cell one here cell two",
    ]
    toml = "# first comment line\n# goes on here\nkey = 1\n\n# short\n"
    assert list(split_toml_comments(toml)) == ["first comment line goes on here"]


def test_demo_refuses_a_folder_with_someone_elses_config(tmp_path: Path, batchd_env: dict[str, str]) -> None:
    (tmp_path / "batchd.toml").write_text('[database]\npath = "/var/lib/app/real.db"\n')
    r = subprocess.run([*batchd_cmd(), "demo", "--dir", str(tmp_path)], env=batchd_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert "not written by batchd demo" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchd.toml"]  # nothing created


@pytest.mark.local_model
@pytest.mark.slow
def test_demo_command_runs_to_completion_then_search_works(tmp_path: Path, batchd_env: dict[str, str]) -> None:
    folder = tmp_path / "demo"
    # Any attempt to reach the network (a model download) would go to a dead proxy and fail the demo.
    offline = {**batchd_env, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "NO_PROXY": "", "HF_HUB_OFFLINE": "0"}
    r = subprocess.run([*batchd_cmd(), "demo", "--dir", str(folder)], env=offline, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    n = len(corpus_chunks())
    assert f"{n} ready, 0 pending, 0 running, 0 failed" in r.stdout, r.stdout
    assert r.stdout.count("\nsearch ") == 2
    assert "  1  " in r.stdout and "Traceback" not in r.stderr
    hint = r.stdout.splitlines()[-1]  # the console script's path, not a bare `batchd` that may not be on PATH
    assert hint.startswith(f"Try your own: {batchd_cmd()[0]} --config ") or hint.startswith("Try your own: .venv/bin/")
    print(r.stdout)  # the demo prints its own timing: shown with -s

    config = folder / "batchd.toml"
    r = subprocess.run([*batchd_cmd(), "--config", str(config), "search", "never pay twice for the same text",
                        "-k", "4", "--json"], env=batchd_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert "local.model_loaded" not in r.stderr  # a one-sentence load is a debug event for search
    assert any("pay twice" in h["text"] for h in hits), hits

    r = subprocess.run([*batchd_cmd(), "--config", str(config), "search", "cosine distance", "-k", "2"],
                       env=batchd_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and len(lines[0]) <= 3 + 2 + 8 + 2 + 6 + 2 + 80

    # A second run in the same folder finds everything already embedded: nothing is queued again.
    result = run_demo(folder, echo=lambda _: None)
    assert result.ok and result.stats["ready"] == n
    store = Store.open(load(config))
    try:
        assert store.vector_count() == n and sum(b.total_chunks for b in store.batches()) == n
    finally:
        store.close()


def test_the_corpus_is_the_docs_themselves_never_a_drifting_copy() -> None:
    from batchd.demo import code_docs
    from tests.conftest import REPO

    corpus = REPO / "batchd" / "demo_corpus"
    assert (corpus / "readme.md").resolve() == (REPO / "README.md").resolve()
    assert (corpus / "batchd.toml").resolve() == (REPO / "etc" / "batchd.toml").resolve()
    assert not (corpus / "code.md").exists()
    docs = code_docs()
    assert "## batchd.manager" in docs and "BatchManager: the queue's state machine" in docs
    shared = REPO.parent / "shared"
    if not shared.is_dir():
        pytest.skip(f"{shared} is not there to compare the copies of the shared notes with")
    for copy, original in (("design.md", "DESIGN.md"), ("style.md", "STYLE.md"), ("vertex.md", "VERTEX.md")):
        assert (corpus / copy).read_text() == (shared / original).read_text(), \
            f"batchd/demo_corpus/{copy} drifted from {shared / original}: cp {shared / original} {corpus / copy}"
