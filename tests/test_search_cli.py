"""`batchd search` error paths through the real console script (no model load needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import MEMBACKEND, batchd_cmd


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dimensions_that_do_not_match_the_local_model_exit_78_naming_both(tmp_path: Path,
                                                                          batchd_env: dict[str, str]) -> None:
    cfg = write(tmp_path / "batchd.toml", f'[database]\npath = "{tmp_path}/a.db"\n'
                '[embedding]\nbackend = "local"\nmodel = "all-MiniLM-L6-v2"\ndimensions = 768\n')
    (tmp_path / "a.db").touch()  # search never creates a database (an empty file is an empty database)
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "search", "hello"], env=batchd_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 78, (r.stdout, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    assert "embedding.dimensions" in line and "768" in line and "384" in line


def test_a_backend_that_cannot_embed_queries_is_a_one_line_error(tmp_path: Path,
                                                                 batchd_env: dict[str, str]) -> None:
    cfg = write(tmp_path / "batchd.toml", f'[database]\npath = "{tmp_path}/a.db"\n'
                f'[embedding]\nbackend = "{MEMBACKEND}"\nmodel = "m"\ndimensions = 16\n')
    (tmp_path / "a.db").touch()  # search never creates a database (an empty file is an empty database)
    r = subprocess.run([*batchd_cmd(), "--config", str(cfg), "search", "hello"], env=batchd_env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if "embed_query" in (Path(__file__).parent / "fakes" / "membackend.py").read_text():
        assert r.returncode == 0, r.stderr  # the test backend learned to embed queries: search just works
        return
    assert r.returncode == 1, (r.stdout, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    assert "cannot embed search queries" in line and "Traceback" not in r.stderr
