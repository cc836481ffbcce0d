"""What the HTTP fakes of Google's services share (fake_vertex.py, fake_gemini_api.py): a threaded server on a free
loopback port, the log of the requests served, the queue of injected faults that ``fail_next`` fills, JSON
answers with Google's error body, and the fake embedding values both services answer with.

A fake subclasses :class:`FakeService` and passes it its request handler (a :class:`JsonHandler` subclass, which
reaches the fake as ``self.fake``); the routes and the service's own state stay in the fake's module.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE"}


def fake_values(text: str, dims: int) -> list[float]:
    """The fakes' embedding of ``text``: multiples of 1/8 in [-1, 1], exact in float32, short in JSON, and NOT
    unit length (like Gemini's vectors below 3,072 values)."""
    digest = hashlib.shake_128(text.encode("utf-8", "surrogatepass")).digest(dims)
    return [((b % 17) - 8) / 8 for b in digest]


def error_body(code: int, message: str, status: str | None = None) -> dict[str, Any]:
    """Google's JSON error answer: ``{"error": {"code", "message", "status"}}``."""
    return {"error": {"code": code, "message": message, "status": status or STATUS_NAMES.get(code, "UNKNOWN")}}


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler that reads a request's body and answers JSON (or raw bytes)."""

    fake: FakeService
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> None:
        """Answer ``body`` as JSON (``{}`` when None), or ``raw`` bytes as application/octet-stream."""
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def answered_fault(self, op: str) -> bool:
        """When a fault is queued for ``op``: answer it (its status, Google's error body) and say so."""
        fault = self.fake.take_fault(op)
        if fault is None:
            return False
        status, message = fault
        self.send(status, error_body(status, message))
        return True


class FakeService:
    """A fake served from a thread of this process. ``with Fake(...) as fake: ...`` or ``start()`` / ``stop()``."""

    thread_name: ClassVar[str] = "fake-service"

    def __init__(self, handler: type[JsonHandler]) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str]] = []  # (op, path) of every request served
        self.lock = threading.RLock()
        self._faults: list[tuple[int, str | None, str]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        own = type(self.handler.__name__, (self.handler,), {"fake": self})  # a handler class for this fake alone
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), own)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name=self.thread_name, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests and faults

    def record(self, op: str, path: str) -> None:
        with self.lock:
            self.requests.append((op, path))

    def count(self, op: str) -> int:
        with self.lock:
            return sum(1 for o, _ in self.requests if o == op)

    def fail_next(self, status: int, times: int = 1, op: str | None = None, message: str = "") -> None:
        """Answer the next ``times`` requests of ``op`` (the fake's names; None = any) with ``status``."""
        with self.lock:
            self._faults.extend([(status, op, message or f"fake: injected {status}")] * times)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def take_fault(self, op: str) -> tuple[int, str] | None:
        """The first queued fault for ``op`` (status, message), removed from the queue; None when there is none."""
        with self.lock:
            for i, (status, fop, msg) in enumerate(self._faults):
                if fop is None or fop == op:
                    del self._faults[i]
                    return status, msg
        return None
