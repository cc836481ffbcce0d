"""Prometheus metrics and /healthz: the textfile and /metrics parsed with prometheus_client's own parser and compared
with `batchd stats --json`; /healthz turning 503 while sync keeps failing and 200 again; counters that survive a
restart. The Worker is stepped in-process with the injected clock; one daemon subprocess serves HTTP for real."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from batchd.cli import main
from batchd.daemon import Worker
from batchd.manager import BatchManager
from batchd.metrics import Metrics, MetricsServer
from batchd.store import Store
from tests.configs import daemon_config
from tests.conftest import MEMBACKEND
from tests.test_daemon import Daemon, daemons, wait_until

FAMILIES = {"batchd_chunks", "batchd_batches", "batchd_oldest_pending_seconds",
            "batchd_last_success_timestamp_seconds", "batchd_vectors_applied", "batchd_chunk_failures",
            "batchd_remote_errors", "batchd_tokens", "batchd_characters", "batchd_cost_usd",
            "batchd_step_duration_seconds"}
PRICED = {"model": "test-model", "unit": "1k_characters", "batch_usd": 0.5, "online_usd": 1.0}


def parse(text: str | bytes) -> dict[str, dict[tuple, float]]:
    """{family: {((label, value), ...) + (sample name,): value}} through prometheus_client's parser."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
        samples = out.setdefault(fam.name, {})
        for s in fam.samples:
            samples[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, family: str, sample: str | None = None, **labels: str) -> float:
    return m[family][(sample or family, *sorted(labels.items()))]


def stats_json(w: Any, tmp_path: Path) -> dict[str, Any]:
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[database]\npath = "{w.config.database.path}"\n[embedding]\nbackend = "{MEMBACKEND}"\n'
                   'model = "test-model"\ndimensions = 16\n')
    r = CliRunner().invoke(main, ["--config", str(cfg), "stats", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return orjson.loads(r.output)


def make_worker(w: Any, tmp_path: Path) -> Worker:
    return Worker(w.manager, clock=w.clock, metrics=Metrics(str(tmp_path / "batchd.prom")))


def test_textfile_has_every_family_in_a_fresh_worker_and_matches_stats_json(world, tmp_path):
    w = world(pricing=PRICED)
    worker = make_worker(w, tmp_path)
    worker.recover()
    fresh = parse((tmp_path / "batchd.prom").read_text())
    assert set(fresh) >= FAMILIES
    for state in ("pending", "running", "ready", "failed"):
        assert value(fresh, "batchd_chunks", state=state) == 0
    for status in ("PENDING", "RUNNING", "COMPLETED", "FAILED"):
        assert value(fresh, "batchd_batches", status=status) == 0
    assert value(fresh, "batchd_oldest_pending_seconds") == 0

    texts = [f"metric text {i} of the corpus" for i in range(30)]
    w.manager.enqueue([(None, t) for t in texts])
    w.knobs(fail_texts=["text 7 "])
    w.clock.advance(120)
    worker.flush(force=True)
    m = parse((tmp_path / "batchd.prom").read_text())
    assert value(m, "batchd_oldest_pending_seconds") == 0 and value(m, "batchd_chunks", state="running") == 30
    worker.sync()
    m = parse((tmp_path / "batchd.prom").read_text())
    st = stats_json(w, tmp_path)
    for state in ("pending", "running", "ready", "failed"):
        assert value(m, "batchd_chunks", state=state) == st[state]
    for status, n in st["batches"].items():
        assert value(m, "batchd_batches", status=status) == n
    answered = [t for t in texts if "text 7 " not in t]
    assert value(m, "batchd_vectors_applied", "batchd_vectors_applied_total") == 29
    assert value(m, "batchd_tokens", "batchd_tokens_total", model="test-model") == sum(len(t.split()) for t in answered)
    assert value(m, "batchd_characters", "batchd_characters_total", model="test-model") == sum(map(len, texts))
    billable = sum(len("".join(t.split())) for t in answered)
    assert abs(value(m, "batchd_cost_usd", "batchd_cost_usd_total", model="test-model") - billable / 1000 * 0.5) < 1e-12
    assert value(m, "batchd_chunk_failures", "batchd_chunk_failures_total", reason="line") == 1
    assert value(m, "batchd_step_duration_seconds", "batchd_step_duration_seconds_count", step="sync") == 1
    assert value(m, "batchd_last_success_timestamp_seconds", step="sync") > 1.7e9
    assert not list(tmp_path.glob(".batchd.prom.*"))  # the temporary file was renamed, not left behind

    # The oldest waiting chunk's age, from the injected clock: the failed line's chunk, queued 120 + 50 s ago.
    w.manager.enqueue([(None, "one more")])
    w.clock.advance(50)
    worker.recover()
    assert value(parse((tmp_path / "batchd.prom").read_text()), "batchd_oldest_pending_seconds") == 170


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_metrics_equal_the_textfile_and_healthz_turns_503_while_sync_fails_then_200(world, tmp_path):
    w = world(queue={"sync_interval": "60s", "flush_interval": "60s"})
    worker = make_worker(w, tmp_path)
    server = MetricsServer(worker.metrics, worker, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        worker.recover()
        w.manager.enqueue([(None, f"healthy text {i}") for i in range(5)])
        worker.flush(force=True)
        code, body = get(base + "/metrics")
        assert code == 200 and body == (tmp_path / "batchd.prom").read_bytes()
        assert set(parse(body)) >= FAMILIES
        assert get(base + "/healthz")[0] == 200

        # Every status call fails: each sync returns normally (errors in its summary) but is not a success.
        w.knobs(status_errors=1000)
        for _ in range(4):
            w.clock.advance(60)
            worker.flush()
            out = worker.sync()
            assert out.ok and out.value.errors and not out.value.ok
        code, body = get(base + "/healthz")
        reason = json.loads(body)
        assert code == 503 and reason["status"] == "unhealthy" and "sync has not succeeded" in reason["reason"]
        assert "429 simulated" in reason["reason"]
        m = parse(get(base + "/metrics")[1])
        assert value(m, "batchd_remote_errors", "batchd_remote_errors_total", kind="status") == 4
        assert value(m, "batchd_healthy") == 0

        w.knobs()
        w.clock.advance(60)
        worker.sync()
        assert get(base + "/healthz") == (200, b'{"status":"ok"}\n')
        assert "spent today $0.0000 + batches of unknown price" in worker.status_line()  # test-model has no price
        assert get(base + "/nothing")[0] == 404
    finally:
        server.stop()


def test_a_tick_skipped_by_backoff_is_not_a_success(world, tmp_path):
    w = world(queue={"sync_interval": "60s", "flush_interval": "60s"})
    worker = make_worker(w, tmp_path)
    assert worker.flush().ok
    t0 = w.clock()
    w.store.close()  # from now on every flush raises (a real failure of the step, caught by the worker)
    w.clock.advance(61)
    assert not worker.flush().ok  # retried at the next tick...
    w.clock.advance(61)
    assert not worker.flush().ok  # ...then backs off for one more interval
    w.clock.now = t0 + 150
    assert worker.flush().skipped and worker.healthy()[0]  # 150 s since the last success: within 3 x 60 s
    w.clock.now = t0 + 181
    assert worker.flush().skipped
    ok, reason = worker.healthy()  # had the skips counted as successes, this would still be healthy
    assert not ok and reason.startswith("flush has not succeeded for 181s")
    w.store = Store.open(w.config)  # for the fixture to close


def test_counters_survive_a_restart(world, tmp_path):
    w = world(pricing=PRICED)
    worker = make_worker(w, tmp_path)
    w.manager.enqueue([(None, f"durable {i} words") for i in range(12)])
    worker.flush(force=True)
    worker.sync()
    before = parse((tmp_path / "batchd.prom").read_text())
    w.store.close()

    store = Store.open(w.config)  # a new process: nothing carried over in memory
    try:
        from batchd.backends import make_backend

        manager = BatchManager(store, make_backend(w.config, store.instance_id), w.config, clock=w.clock)
        again = Worker(manager, clock=w.clock, metrics=Metrics(str(tmp_path / "again.prom")))
        again.recover()
        after = parse((tmp_path / "again.prom").read_text())
    finally:
        w.store = store  # closed by the fixture
    for fam, sample, labels in (("batchd_vectors_applied", "batchd_vectors_applied_total", {}),
                                ("batchd_tokens", "batchd_tokens_total", {"model": "test-model"}),
                                ("batchd_characters", "batchd_characters_total", {"model": "test-model"}),
                                ("batchd_cost_usd", "batchd_cost_usd_total", {"model": "test-model"})):
        assert value(after, fam, sample, **labels) == value(before, fam, sample, **labels) > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_serves_metrics_and_healthz_over_http(tmp_path, batchd_env, daemons):
    from tests.fakes.membackend import set_knobs
    from tests.test_daemon import enqueue

    port = free_port()
    prom = tmp_path / "batchd.prom"
    cfg = daemon_config(tmp_path, flush="0.3s", sync="0.3s",
                        metrics={"listen": f"127.0.0.1:{port}", "textfile": prom})
    enqueue(cfg, batchd_env, [f"daemon metric text {i}" for i in range(8)])
    d: Daemon = daemons(cfg, batchd_env)
    d.wait_event("metrics.listening")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: value(parse(get(base + "/metrics")[1]), "batchd_chunks", state="ready") == 8, what="8 ready")
    assert get(base + "/healthz")[0] == 200
    assert set(parse(prom.read_text())) >= FAMILIES

    set_knobs(tmp_path / "testbackend", status_errors=100_000)
    enqueue(cfg, batchd_env, ["one that will stay running"])
    code, body = wait_until(lambda: (r := get(base + "/healthz"))[0] == 503 and r, timeout=60, what="503")
    assert "sync" in json.loads(body)["reason"]
    set_knobs(tmp_path / "testbackend")
    wait_until(lambda: get(base + "/healthz")[0] == 200, timeout=60, what="200 again")
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
