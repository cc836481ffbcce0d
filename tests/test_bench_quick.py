"""`python -m bench --quick` runs end to end and ends with the JSON summary (figures only: no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEYS = ("enqueue_per_s", "flush_per_s", "sync_per_s", "limit_per_s", "naive_per_s", "sync_vs_limit", "sync_vs_naive",
        "peak_rss_mb_30k", "peak_rss_mb_10k", "writer_max_wait_ms", "stats_1m_ms", "sync_cpu_vs_limit_cpu", "sync_cpus_busy")


@pytest.mark.slow
def test_quick_benchmark_prints_every_figure(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--workdir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("sync ") for line in lines), proc.stdout  # the table came first
    summary = json.loads(lines[-1])
    for key in KEYS:
        assert isinstance(summary[key], (int, float)), (key, summary)
    assert summary["sync_per_s"] > 0 and summary["limit_per_s"] > 0
