"""A fake of the Gemini Developer API's REST surface (v1beta) that the REAL google-genai client talks to through
``genai.Client(api_key=..., http_options=types.HttpOptions(base_url=fake.url))``.

It serves what batchd's ``gemini-api`` backend and ``batchd search`` use, with the paths and JSON field names
the SDK sends and reads (google-genai 3.x: files.py, batches.py, models.py, _api_client.py):

- Files API: resumable upload (``POST /upload/v1beta/files`` with ``X-Goog-Upload-Command: start`` answering an
  ``X-Goog-Upload-URL``; then ``upload`` / ``upload, finalize`` chunks answering ``X-Goog-Upload-Status``),
  ``GET/DELETE /v1beta/files/{id}``, ``GET /v1beta/files/{id}:download?alt=media``. A missing or expired file
  answers 403 PERMISSION_DENIED, as the real service does.
- Batches: ``POST /v1beta/models/{m}:asyncBatchEmbedContent`` (body ``{"batch": {"displayName", "inputConfig":
  {"file_name"}}}``), ``GET /v1beta/batches/{id}``, ``GET /v1beta/batches?pageSize=&pageToken=`` (short pages,
  ``{"operations": [...], "nextPageToken"}``), ``POST /v1beta/batches/{id}:cancel``, ``DELETE
  /v1beta/batches/{id}``. A batch is a long-running Operation: ``{"name", "metadata": {EmbedContentBatch},
  "done", "error"}``; the SDK's BatchJob keeps only some metadata fields and drops ``error``/``batchStats``.
- ``POST /v1beta/models/{m}:batchEmbedContents``: the online embedding of ``batchd search`` queries.

Every request must carry the fake's API key in ``x-goog-api-key`` (else 400 API_KEY_INVALID). Batches move only
when the test says so (:meth:`step`, :meth:`finish`) or, with ``auto_finish``, when polled.

Knobs (plain attributes): ``shuffle``, ``drop``, ``fail``, ``final_state``, ``partial`` (fraction of lines a
FAILED/CANCELLED/EXPIRED batch exports, None = no result file), ``output_dims`` (e.g. 3072 parent vectors),
``token_count`` ("string" | "int" | None), ``malformed``, ``expire_results`` (result files answer 403 once
written), ``max_page_size``, ``empty_pages``, ``lose_create`` / ``lose_create_mode``, ``auto_finish``; and
:meth:`fail_next` (answer N requests of one kind with 429/503/...), :meth:`add_foreign_batch` (another
application's batch in the same project).
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random
import urllib.parse
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.fakes.httpfake import FakeService, JsonHandler, error_body, fake_values

API_KEY = "test-gemini-key-4f1d9c0b7e2a"  # a recognisable string: tests grep every output for it
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
_FLOW = ("PENDING", "RUNNING")
_GONE = "You do not have permission to access the File {id} or it may not exist."


def expected_values(text: str, dims: int, out_dims: int | None = None) -> list[float]:
    """What batchd must store: the first ``dims`` of the ``out_dims`` values answered, scaled to unit length."""
    vals = fake_values(text, out_dims or dims)[:dims]
    norm = math.sqrt(sum(v * v for v in vals))
    return [v / norm for v in vals]


def decode(blob: bytes) -> list[float]:
    return array("f", blob).tolist()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeFile:
    id: str
    display_name: str
    mime_type: str
    data: bytes
    source: str  # UPLOADED | GENERATED
    created: str = field(default_factory=_now)
    expired: bool = False

    def as_json(self) -> dict[str, Any]:
        out = {"name": f"files/{self.id}", "displayName": self.display_name, "mimeType": self.mime_type,
               "sizeBytes": str(len(self.data)), "createTime": self.created, "updateTime": self.created,
               "expirationTime": self.created, "sha256Hash": "", "state": "ACTIVE", "source": self.source,
               "uri": f"https://fake/v1beta/files/{self.id}"}
        if self.source == "GENERATED":
            out["downloadUri"] = f"https://fake/download/v1beta/files/{self.id}:download?alt=media"
        return out


@dataclass
class FakeBatch:
    id: str
    display_name: str
    model: str
    input_file: str
    state: str = "PENDING"
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    ended: str | None = None
    output_file: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    foreign: bool = False
    deleted: bool = False

    def as_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.EmbedContentBatch",
            "model": self.model, "name": f"batches/{self.id}", "displayName": self.display_name,
            "inputConfig": {"fileName": self.input_file}, "createTime": self.created, "updateTime": self.updated,
            "state": f"BATCH_STATE_{self.state}",
            "batchStats": {k: str(v) for k, v in self.stats.items()},
        }
        if self.ended:
            meta["endTime"] = self.ended
        if self.output_file:
            meta["output"] = {"responsesFile": self.output_file}
        op: dict[str, Any] = {"name": f"batches/{self.id}", "metadata": meta, "done": self.state in FINAL}
        if self.error:
            op["error"] = self.error
        elif self.state == "SUCCEEDED":
            op["response"] = dict(meta)
        return op


class FakeGeminiApi(FakeService):
    """The fake service. ``with FakeGeminiApi() as fake: ...`` or ``start()`` / ``stop()``."""

    thread_name = "fake-gemini-api"

    def __init__(self, api_key: str = API_KEY) -> None:
        super().__init__(_Handler)
        self.api_key = api_key
        self.files: dict[str, FakeFile] = {}
        self.batches: dict[str, FakeBatch] = {}
        self.answered: set[str] = set()  # texts the service has returned a vector for
        self.sent_again_after_answer = 0  # "never pay twice": texts in a new batch that were answered before
        self.texts_sent = 0
        # knobs
        self.shuffle = True
        self.drop: Callable[[str], bool] = lambda text: False
        self.fail: Callable[[str], str | None] = lambda text: None
        self.final_state = "SUCCEEDED"
        self.partial: float | None = None
        self.output_dims: int | None = None
        self.token_count: str | None = "string"
        self.malformed = 0
        self.expire_results = False
        self.max_page_size = 2
        self.empty_pages = False
        self.lose_create = 0
        self.lose_create_mode = "503"  # or "reset"
        self.auto_finish = False
        self._ids = itertools.count(1)
        self._uploads: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ test controls
    # (and FakeService's fail_next / count; the ops are upload_start, upload, file_get, file_delete, download,
    # create, get, list, cancel, delete and embed)

    def ours(self) -> list[FakeBatch]:
        with self.lock:
            return [b for b in self.batches.values() if not b.foreign]

    def add_foreign_batch(self, display_name: str = "someone-elses-job", state: str = "RUNNING") -> str:
        """Another application's batch in the same project; batchd must never cancel, delete or adopt it."""
        with self.lock:
            bid = f"other{next(self._ids)}"
            self.batches[bid] = FakeBatch(bid, display_name, "models/gemini-embedding-001", "files/not-ours",
                                          state=state, foreign=True)
            return f"batches/{bid}"

    def touched(self, name: str) -> list[str]:
        """Every request (op) that named this batch."""
        bid = name.removeprefix("batches/")
        with self.lock:
            return [o for o, p in self.requests if p.split("?")[0].endswith(f"batches/{bid}")
                    or p.split("?")[0].endswith(f"batches/{bid}:cancel")]

    def step(self, name: str | None = None) -> None:
        """Move each (or one) unfinished batch one state on: PENDING, RUNNING, then final_state."""
        with self.lock:
            targets = [self.batches[name.removeprefix("batches/")]] if name else [
                b for b in self.batches.values() if not b.foreign]
        for b in targets:
            if b.state in FINAL:
                continue
            if b.state == "PENDING":
                b.state, b.updated = "RUNNING", _now()
            else:
                self._finalise(b, self.final_state)

    def finish(self, name: str | None = None) -> None:
        for _ in range(len(_FLOW) + 1):
            self.step(name)

    def expire_file(self, name: str) -> None:
        with self.lock:
            self.files[name.removeprefix("files/")].expired = True

    def state(self, name: str) -> str:
        with self.lock:
            return self.batches[name.removeprefix("batches/")].state

    # ------------------------------------------------------------------ batch output

    def _input_lines(self, b: FakeBatch) -> list[dict[str, Any]]:
        f = self.files.get(b.input_file.removeprefix("files/"))
        if f is None:
            return []
        return [orjson.loads(line) for line in f.data.splitlines() if line.strip()]

    def _finalise(self, b: FakeBatch, state: str) -> None:
        lines = self._input_lines(b)
        exported = len(lines)
        if state != "SUCCEEDED":
            exported = 0 if self.partial is None else int(len(lines) * self.partial)
        out: list[bytes] = []
        ok = failed = 0
        for line in lines[:exported]:
            req = line.get("request") or {}
            text = req["content"]["parts"][0]["text"]
            if self.drop(text):
                continue
            reason = self.fail(text)
            if reason:
                failed += 1
                out.append(orjson.dumps({"key": line.get("key"), "error": {
                    "code": 400, "message": reason, "status": "INVALID_ARGUMENT"}}))
                continue
            dims = self.output_dims or int(req.get("output_dimensionality") or req.get("outputDimensionality")
                                           or 3072)
            resp: dict[str, Any] = {"embedding": {"values": fake_values(text, dims)}}
            tokens = len(text.split())
            if self.token_count == "string":
                resp["tokenCount"] = str(tokens)
            elif self.token_count == "int":
                resp["tokenCount"] = tokens
            out.append(orjson.dumps({"key": line.get("key"), "response": resp}))
            ok += 1
            with self.lock:
                self.answered.add(text)
        if self.shuffle:
            random.Random(b.id).shuffle(out)
        out[:0] = [b"{not json"] * self.malformed
        with self.lock:
            if out or state == "SUCCEEDED":
                fid = f"batch-{b.id}"
                self.files[fid] = FakeFile(fid, f"responses of batches/{b.id}", "application/jsonl",
                                           b"\n".join(out) + (b"\n" if out else b""), "GENERATED",
                                           expired=self.expire_results)
                b.output_file = f"files/{fid}"
            b.stats = {"requestCount": len(lines), "successfulRequestCount": ok, "failedRequestCount": failed,
                       "pendingRequestCount": len(lines) - exported}
            b.state, b.updated, b.ended = state, _now(), _now()
            if state == "FAILED":
                b.error = {"code": 13, "message": "fake: the batch failed part way"}
            elif state == "EXPIRED":
                b.error = {"code": 4, "message": "fake: the batch expired in the queue"}
            elif state == "CANCELLED":
                b.error = {"code": 1, "message": "fake: the batch was cancelled"}

    # ------------------------------------------------------------------ request handling (called by _Handler)

    def create_batch(self, model: str, body: dict[str, Any]) -> tuple[int, Any]:
        batch = body.get("batch") or {}
        cfg = batch.get("inputConfig") or batch.get("input_config") or {}
        file_name = cfg.get("file_name") or cfg.get("fileName") or ""
        with self.lock:
            f = self.files.get(file_name.removeprefix("files/"))
            if f is None or f.expired:
                return 400, error_body(400, f"fake: input file {file_name!r} does not exist", "INVALID_ARGUMENT")
            bid = f"b{next(self._ids):04d}x{random.randrange(16**6):06x}"
            b = FakeBatch(bid, batch.get("displayName") or batch.get("display_name") or "", f"models/{model}",
                          file_name)
            self.batches[bid] = b
            for line in self._input_lines(b):
                text = line["request"]["content"]["parts"][0]["text"]
                self.texts_sent += 1
                if text in self.answered:
                    self.sent_again_after_answer += 1
            return 200, b.as_json()

    def list_page(self, size: int, token: str) -> dict[str, Any]:
        with self.lock:
            visible = [b for b in self.batches.values() if not b.deleted]
            start, empty_done = (int(token.split(".")[0]), token.endswith(".e")) if token else (0, False)
            if self.empty_pages and not empty_done and start < len(visible):
                return {"operations": [], "nextPageToken": f"{start}.e"}
            n = max(1, min(size or 50, self.max_page_size))
            page = visible[start:start + n]
            out: dict[str, Any] = {"operations": [b.as_json() for b in page]}
            if start + n < len(visible):
                out["nextPageToken"] = str(start + n)
            return out


class _Handler(JsonHandler):
    fake: FakeGeminiApi

    def _route(self, method: str) -> None:
        fake = self.fake
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, dict(urllib.parse.parse_qsl(url.query))
        body = self.read_body()
        op = _op(method, path, query, self.headers)
        fake.record(op, self.path)
        # The upload session URL is its own credential: the SDK sends its chunks without the key.
        if op != "upload" and self.headers.get("x-goog-api-key") != fake.api_key:
            self.send(400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                                       "status": "INVALID_ARGUMENT",
                                       "details": [{"reason": "API_KEY_INVALID"}]}})
            return
        if self.answered_fault(op):
            return
        handler = getattr(self, "_" + op, None)
        if handler is None:
            self.send(404, error_body(404, f"fake: no route for {method} {path}", "NOT_FOUND"))
            return
        handler(path, query, body)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # -- Files API

    def _upload_start(self, path: str, query: dict[str, str], body: bytes) -> None:
        fake = self.fake
        meta = (orjson.loads(body) if body else {}).get("file") or {}
        fid = (meta.get("name") or "").removeprefix("files/") or f"f{next(fake._ids):06d}"
        with fake.lock:
            if fid in fake.files and not fake.files[fid].expired:
                self.send(409, error_body(409, f"fake: File files/{fid} already exists.", "ALREADY_EXISTS"))
                return
            upload_id = f"u{next(fake._ids)}"
            fake._uploads[upload_id] = {"id": fid, "display": meta.get("displayName") or "",
                                        "mime": self.headers.get("X-Goog-Upload-Header-Content-Type") or "",
                                        "size": int(self.headers.get("X-Goog-Upload-Header-Content-Length") or 0),
                                        "buf": bytearray()}
        self.send(200, {}, {"x-goog-upload-url": f"{fake.url}/upload/v1beta/files?upload_id={upload_id}",
                             "x-goog-upload-status": "active"})

    def _upload(self, path: str, query: dict[str, str], body: bytes) -> None:
        fake = self.fake
        with fake.lock:
            up = fake._uploads.get(query.get("upload_id", ""))
            if up is None or int(self.headers.get("X-Goog-Upload-Offset") or -1) != len(up["buf"]):
                self.send(400, error_body(400, "fake: bad upload session or offset", "INVALID_ARGUMENT"))
                return
            up["buf"] += body
            if "finalize" not in (self.headers.get("X-Goog-Upload-Command") or ""):
                self.send(200, {}, {"x-goog-upload-status": "active"})
                return
            del fake._uploads[query["upload_id"]]
            f = FakeFile(up["id"], up["display"], up["mime"], bytes(up["buf"]), "UPLOADED")
            fake.files[f.id] = f
        self.send(200, {"file": f.as_json()}, {"x-goog-upload-status": "final"})

    def _file(self, path: str) -> FakeFile | None:
        fid = path.removeprefix("/v1beta/files/").removesuffix(":download")
        f = self.fake.files.get(fid)
        if f is None or f.expired:
            self.send(403, error_body(403, _GONE.format(id=fid), "PERMISSION_DENIED"))
            return None
        return f

    def _file_get(self, path: str, query: dict[str, str], body: bytes) -> None:
        f = self._file(path)
        if f:
            self.send(200, f.as_json())

    def _file_delete(self, path: str, query: dict[str, str], body: bytes) -> None:
        f = self._file(path)
        if f:
            with self.fake.lock:
                del self.fake.files[f.id]
            self.send(200, {})

    def _download(self, path: str, query: dict[str, str], body: bytes) -> None:
        f = self._file(path)
        if f:
            self.send(200, raw=f.data)

    # -- batches

    def _create(self, path: str, query: dict[str, str], body: bytes) -> None:
        fake = self.fake
        model = path.removeprefix("/v1beta/models/").removesuffix(":asyncBatchEmbedContent")
        status, answer = fake.create_batch(model, orjson.loads(body or b"{}"))
        if status == 200 and fake.lose_create > 0:
            with fake.lock:
                fake.lose_create -= 1
            if fake.lose_create_mode == "reset":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.send(503, error_body(503, "fake: the batch was created but the answer was lost", "UNAVAILABLE"))
            return
        self.send(status, answer)

    def _batch(self, path: str) -> FakeBatch | None:
        bid = path.removeprefix("/v1beta/batches/").removesuffix(":cancel")
        b = self.fake.batches.get(bid)
        if b is None or b.deleted:
            self.send(404, error_body(404, f"fake: batches/{bid} not found", "NOT_FOUND"))
            return None
        return b

    def _get(self, path: str, query: dict[str, str], body: bytes) -> None:
        b = self._batch(path)
        if b is None:
            return
        if self.fake.auto_finish and not b.foreign:
            self.fake.finish(f"batches/{b.id}")
        with self.fake.lock:
            self.send(200, b.as_json())

    def _list(self, path: str, query: dict[str, str], body: bytes) -> None:
        self.send(200, self.fake.list_page(int(query.get("pageSize") or 0), query.get("pageToken") or ""))

    def _cancel(self, path: str, query: dict[str, str], body: bytes) -> None:
        b = self._batch(path)
        if b is None:
            return
        if b.state in FINAL:
            self.send(400, error_body(400, f"fake: batch is already {b.state}", "FAILED_PRECONDITION"))
            return
        self.fake._finalise(b, "CANCELLED")
        self.send(200, {})

    def _delete(self, path: str, query: dict[str, str], body: bytes) -> None:
        b = self._batch(path)
        if b is None:
            return
        with self.fake.lock:
            b.deleted = True  # deleting does not cancel: a running batch goes on (and is billed)
        self.send(200, {})

    # -- online embedding (batchd search)

    def _embed(self, path: str, query: dict[str, str], body: bytes) -> None:
        reqs = orjson.loads(body or b"{}").get("requests") or []
        out = []
        for r in reqs:
            text = r["content"]["parts"][0]["text"]
            dims = self.fake.output_dims or int(r.get("outputDimensionality") or r.get("output_dimensionality")
                                                or 3072)
            out.append({"values": fake_values(text, dims)})
        self.send(200, {"embeddings": out})


def _op(method: str, path: str, query: dict[str, str], headers: Any) -> str:
    if path == "/upload/v1beta/files" and method == "POST":
        return "upload" if "upload_id" in query else "upload_start"
    if path.startswith("/v1beta/files/"):
        if path.endswith(":download"):
            return "download"
        return {"GET": "file_get", "DELETE": "file_delete"}.get(method, "?")
    if path.endswith(":asyncBatchEmbedContent"):
        return "create"
    if path.endswith(":batchEmbedContents"):
        return "embed"
    if path == "/v1beta/batches":
        return "list"
    if path.startswith("/v1beta/batches/"):
        if path.endswith(":cancel"):
            return "cancel"
        return {"GET": "get", "DELETE": "delete"}.get(method, "?")
    return "?"


__all__ = ["API_KEY", "FakeBatch", "FakeFile", "FakeGeminiApi", "decode", "expected_values", "fake_values"]
