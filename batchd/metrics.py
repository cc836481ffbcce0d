"""Prometheus metrics (through prometheus_client) for node_exporter's textfile collector and for ``/metrics``, and the
``/healthz`` answer for a load balancer or a Kubernetes probe.

After every worker step, :meth:`Metrics.refresh` reads the database and the worker's state ON THE WORKER THREAD
(the one that owns the SQLite connection), renders the exposition text once, writes it to ``[metrics] textfile``
atomically (a temporary file in the same folder, then rename) and keeps it for the HTTP server, so the file and
``/metrics`` always hold the same series. The HTTP thread never touches the database.

Counters that must survive restarts (vectors, tokens, characters, cost, chunk failures) are derived from the
database (the cost ledger, batchd/store/ledger.py); remote errors and step durations are process-lifetime, as
Prometheus expects of a counter that resets on restart. Every label value of ``batchd_chunks`` and
``batchd_batches`` is exported even at 0, and every family exists in a fresh daemon.

``/healthz``: 200 while the last success of flush and of sync (a step skipped because another batchd process held
the database counts as one) is within 3 of the step's intervals; otherwise 503 with a one-line JSON reason. A
sync in which any batch's remote call failed is not a success, nor is a tick skipped by backoff.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from batchd.errors import one_line
from batchd.store import FAILURE_REASONS, parse_iso

log = structlog.get_logger("batchd.metrics")

CHUNK_STATES = ("pending", "running", "ready", "failed")
BATCH_STATUSES = ("PENDING", "RUNNING", "COMPLETED", "FAILED")
REMOTE_CALLS = ("submit", "find_job", "status", "results", "cancel")
HEALTH_STEPS = ("flush", "sync")
STALE_INTERVALS = 3  # /healthz: a step whose last success is older than this many intervals is unhealthy
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class _Snapshot:
    """A custom collector yielding the families computed by the last refresh (never reads the database)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class Metrics:
    """The series of one worker. Build it once per process; call :meth:`refresh` after every step."""

    def __init__(self, textfile: str = "") -> None:
        self.textfile = textfile
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)  # type: ignore[arg-type]
        self.step_duration = Histogram("batchd_step_duration_seconds", "Duration of worker steps.", ["step"],
                                       registry=self.registry, buckets=DURATION_BUCKETS)
        for step in ("recover", "flush", "sync"):
            self.step_duration.labels(step=step)
        self._lock = threading.Lock()
        self._text = b""
        self._textfile_error = ""
        self.refreshes = 0

    # ------------------------------------------------------------------ the worker thread

    def after_step(self, worker: Any, step: str, seconds: float | None) -> None:
        """Record a step's duration (None: skipped) and refresh. Never raises: metrics do not fail the worker."""
        try:
            if seconds is not None:
                self.step_duration.labels(step=step).observe(seconds)
            self.refresh(worker)
        except Exception as e:
            log.warning("metrics.refresh_failed", error=one_line(e), exc_info=True)

    def serve(self, worker: Any, listen: tuple[str, int]) -> MetricsServer | bool:
        """Start ``/metrics`` and ``/healthz`` on ``listen``; False (logged) when the address cannot be bound."""
        try:
            return MetricsServer(self, worker, *listen).start()
        except OSError as e:
            log.error("metrics.listen_failed", host=listen[0], port=listen[1], error=one_line(e))
            return False

    def refresh(self, worker: Any) -> bytes:
        """Recompute every series from the database and the worker, render, write the textfile. Returns the text."""
        self._snapshot.families = list(_families(worker))
        text = generate_latest(self.registry)
        with self._lock:
            self._text = text
        self.refreshes += 1
        if self.textfile:
            self._write_textfile(text)
        return text

    def _write_textfile(self, text: bytes) -> None:
        path = Path(self.textfile)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
        try:
            with open(tmp, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # node_exporter runs as another user
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            message = f"{e.strerror or e}: {e.filename or path}"
            if message != self._textfile_error:  # once per distinct problem, not at every step
                log.warning("metrics.textfile_failed", path=str(path), error=message)
            self._textfile_error = message
            return
        if self._textfile_error:
            log.info("metrics.textfile_recovered", path=str(path))
            self._textfile_error = ""

    # ------------------------------------------------------------------ any thread

    def text(self) -> bytes:
        with self._lock:
            return self._text


def _families(worker: Any) -> Iterator[Metric]:
    manager = worker.manager
    store = manager.store
    stats = store.queue_stats()
    g = GaugeMetricFamily("batchd_chunks", "Chunks by state (the same numbers as `batchd stats --json`).",
                          labels=["state"])
    for state in CHUNK_STATES:
        g.add_metric([state], stats.get(state, 0))
    yield g
    g = GaugeMetricFamily("batchd_batches", "Batches by status.", labels=["status"])
    for status in BATCH_STATUSES:
        g.add_metric([status], stats.get("batches", {}).get(status, 0))
    yield g
    oldest = parse_iso(store.oldest_pending_at())
    yield GaugeMetricFamily("batchd_oldest_pending_seconds",
                            "Age of the oldest chunk waiting for a batch (0 when none waits).",
                            value=max(0.0, manager.clock() - oldest) if oldest is not None else 0.0)
    g = GaugeMetricFamily("batchd_last_success_timestamp_seconds",
                          "When each step last succeeded (Unix time); absent until it has.", labels=["step"])
    for name in HEALTH_STEPS:
        st = worker.steps.get(name)
        if st is not None and st.last_ok_at is not None:
            g.add_metric([name], st.last_ok_at)
    yield g
    healthy, _ = worker.healthy()
    yield GaugeMetricFamily("batchd_healthy", "1 when /healthz would answer 200.", value=1 if healthy else 0)

    yield CounterMetricFamily("batchd_vectors_applied", "Vectors written from job results or copied locally.",
                              value=store.vectors_applied_total())
    c = CounterMetricFamily("batchd_chunk_failures", "Failed chunk attempts, by reason class.", labels=["reason"])
    for reason, n in store.chunk_failures_by_reason().items():
        c.add_metric([reason], n)
    yield c
    c = CounterMetricFamily("batchd_remote_errors", "Failed remote calls since this process started, by call.",
                            labels=["kind"])
    for kind in REMOTE_CALLS:
        c.add_metric([kind], manager.remote_errors.get(kind, 0))
    yield c

    tokens = CounterMetricFamily("batchd_tokens", "Input tokens billed (as the service reported them).",
                                 labels=["model"])
    chars = CounterMetricFamily("batchd_characters", "Characters sent (Unicode code points, every submission).",
                                labels=["model"])
    cost = CounterMetricFamily("batchd_cost_usd", "Cost of applied batches in USD (absent while unknown).",
                               labels=["model"])
    for m in store.ledger(None):
        tokens.add_metric([m.model], m.tokens)
        chars.add_metric([m.model], m.characters)
        if m.cost_usd is not None:
            cost.add_metric([m.model], m.cost_usd)
    yield tokens
    yield chars
    yield cost

    spend = GaugeMetricFamily("batchd_spend_usd", "Spend (billed plus estimates in flight) this UTC day and month.",
                              labels=["period"])
    from batchd.cost import budget_state

    st = budget_state(store, manager.config, manager.clock())
    spend.add_metric(["day"], st.spent_today)
    spend.add_metric(["month"], st.spent_month)
    yield spend
    yield GaugeMetricFamily("batchd_over_budget", "1 while flush declines to submit because of [budget].",
                            value=1 if st.over else 0)


def health(worker: Any) -> tuple[bool, str]:
    """(True, "") while flush and sync last succeeded within STALE_INTERVALS of their intervals; else (False, why).

    Before a step's first success the worker's start counts, so a fresh daemon is healthy for 3 intervals.
    """
    now = worker.clock()
    for name in HEALTH_STEPS:
        st = worker.steps[name]
        since = st.last_ok if st.last_ok is not None else worker.started
        if now - since > STALE_INTERVALS * st.interval:
            why = st.last_error or st.problem or ("backing off" if now < st.retry_at else "not run")
            what = "has not succeeded" if st.last_ok is not None else "has not succeeded since start"
            return False, (f"{name} {what} for {now - since:.0f}s (limit {STALE_INTERVALS} x {st.interval:g}s): "
                           f"{why}")[:400]
    return True, ""


# ---------------------------------------------------------------------------------------------- HTTP


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a small threaded HTTP server (a daemon thread)."""

    def __init__(self, metrics: Metrics, worker: Any, host: str, port: int):
        self.metrics = metrics
        self.worker = worker
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="batchd-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics.listening", host=str(self.address[0]), port=int(self.address[1]))
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, server.metrics.text(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, reason = server.worker.healthy()
                body = {"status": "ok" if ok else "unhealthy", **({"reason": reason} if reason else {})}
                self._answer(200 if ok else 503, orjson.dumps(body) + b"\n", "application/json")
            else:
                self._answer(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _answer(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # no per-request lines on stderr
            return

    return Handler


__all__ = ["BATCH_STATUSES", "CHUNK_STATES", "FAILURE_REASONS", "REMOTE_CALLS", "Metrics", "MetricsServer", "health"]
