"""A fake Vertex AI JobService speaking the REST wire format, for tests with the real aiplatform client.

It serves create / get / list (label filters, paging) / cancel of batchPredictionJobs and an online
``:predict``, on a free loopback port, from a thread. Job input is read from the Cloud Storage emulator and
output JSONL is written back there in the two formats of VERTEX.md, with vectors from :func:`fake_values`.
Jobs move only when the test says so (:meth:`FakeVertex.step`, :meth:`FakeVertex.finish`).

Knobs (plain attributes, set them before ``finish``): ``shuffle``, ``split``, ``drop``, ``fail``,
``errors_file``, ``final_state``, ``echo_unknown``, ``output_dims``, ``malformed``, ``auto_finish``; and
:meth:`FakeVertex.fail_next` (answer N requests with 429/503/400...), ``lose_create`` (create the job, then
answer 503 or reset the connection).

What real jobs do that the documentation glosses over (issue 10; VERTEX.md), each behind a switch:
``gemini_parent`` (3,072-value unit parent vectors whatever ``output_dimensionality`` asks),
``export_fraction`` (a job ending FAILED/CANCELLED/EXPIRED — also by a cancel — exports its first rows),
``incremental`` (copies of the rows under ``incremental_predictions/`` in the output folder),
``token_count_string`` (Gemini ``"tokenCount": "2"``), ``truncate`` (classic ``statistics.truncated``),
``error_shape`` ("status", "errors_file", "bare_instance", "status_only"), ``singular_prediction``,
``echo_task`` (classic echo of ``task_type``: "lower", "camel", "drop"), ``mangle_echo`` (an echo that names
no sent text), ``hold`` ("PAUSED"/"UPDATING": a running job stops there until cleared), ``cancel_lag`` (a
cancel goes through CANCELLING first). :meth:`FakeVertex.resent_after_answer` is the "never pay twice" figure.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import urllib.parse
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from google.cloud import aiplatform_v1

from tests.fakes.httpfake import FakeService, JsonHandler, error_body, fake_values

FINAL_STATES = ("SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
_FLOW = ("QUEUED", "PENDING", "RUNNING")


def fake_vector(text: str, dims: int, *, unit: bool = False) -> bytes:
    """:func:`fake_values` as the little-endian float32 blob batchd stores; ``unit``: renormalised, as batchd
    stores Gemini vectors (and every vector it had to cut from a longer one)."""
    values = fake_values(text, dims)
    return array("f", _unit(values) if unit else values).tobytes()


def _unit(values: list[float]) -> list[float]:
    vec = array("f", values)  # as batchd computes it (vectors.fit_vector): the float32 values' norm, then x / norm
    norm = math.hypot(*vec)
    return [x / norm for x in vec]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FakeVertex(FakeService):
    """The fake service. ``with FakeVertex(gcs_client) as fake: ...`` or ``start()`` / ``stop()``."""

    thread_name = "fake-vertex"

    def __init__(self, storage_client: Any, project: str = "proj", location: str = "us-central1") -> None:
        super().__init__(_Handler)
        self.storage = storage_client
        self.project, self.location = project, location
        self.jobs: dict[str, aiplatform_v1.BatchPredictionJob] = {}
        # knobs
        self.shuffle = False
        self.split = 1
        self.drop: Callable[[str], bool] = lambda text: False
        self.fail: Callable[[str], str | None] = lambda text: None
        self.errors_file = False  # failed lines go to errors_0001.jsonl ({"error": {...}}) instead of status
        self.final_state = "SUCCEEDED"
        self.echo_unknown = True  # classic: echo the instance as sent; False keeps only "content"
        self.output_dims: int | None = None  # force a vector size (tests the length check)
        self.malformed = 0  # garbage lines added to the first output file
        self.max_page_size = 1  # small pages, so list callers must follow nextPageToken
        self.lose_create = 0  # creates whose response is lost after the job was made
        self.lose_create_mode = "503"  # or "reset": close the connection without an answer
        self.auto_finish = False  # a get of an unfinished job runs it to its end first (for CLI/daemon tests)
        self.gemini_parent = False
        self.export_fraction: float | None = None
        self.incremental = False
        self.token_count_string = False
        self.truncate: Callable[[str], bool] = lambda text: False
        self.error_shape = "status"
        self.singular_prediction = False
        self.echo_task: str | None = None
        self.mangle_echo: Callable[[str], str] | None = None
        self.hold: str | None = None
        self.cancel_lag = False
        self.answered: dict[str, int] = {}  # text -> when (self._clock) an output first answered it with a vector
        self.created: dict[str, int] = {}  # job name -> when (self._clock) it was created
        self.sent: dict[str, list[str]] = {}  # job name -> the texts of its input (recorded when it ran)
        self.resent: list[tuple[str, str]] = []  # filled by resent_after_answer()
        self._clock = 0  # orders creates and exports
        self._seq = 0

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    # ------------------------------------------------------------------ test controls
    # (and FakeService's fail_next / clear_faults / count; the ops are create, get, list, cancel and predict)

    def state(self, name: str) -> str:
        with self.lock:
            return self.jobs[name].state.name.removeprefix("JOB_STATE_")

    def resent_after_answer(self) -> int:
        """Texts sent again after the service had answered them (and billed them): must be 0.

        Reads every job's staged input: ``resent`` lists each (job, text) sent in a job created after an
        earlier output had answered that text with a vector."""
        with self.lock:
            jobs = sorted(self.created.items(), key=lambda kv: kv[1])
            answered = dict(self.answered)
        resent = []
        for name, created in jobs:
            texts = self.sent.get(name)
            if texts is None:  # a job that never ran: its input is still staged
                texts = []
                for uri in self.jobs[name].input_config.gcs_source.uris:
                    try:
                        texts += [_text(orjson.loads(raw)) for raw in self._read_lines(uri)]
                    except Exception:  # noqa: BLE001 - no input staged (bench jobs): nothing sent
                        pass
            resent += [(name, t) for t in texts if answered.get(t, created) < created]
        self.resent = resent
        return len(resent)

    def step(self, name: str | None = None) -> None:
        """Move each (or one) unfinished job one state on: QUEUED, PENDING, RUNNING, then final_state."""
        for job_name in [name] if name else list(self.jobs):
            st = self.state(job_name)
            if st in FINAL_STATES:
                continue
            if st == "CANCELLING":
                self._set_final(job_name, "CANCELLED")
                continue
            if self.hold and st in ("RUNNING", self.hold):
                self._set_state(job_name, self.hold)
                continue
            if st in ("PAUSED", "UPDATING"):
                self._set_state(job_name, "RUNNING")
                continue
            i = _FLOW.index(st) if st in _FLOW else len(_FLOW) - 1
            if i + 1 < len(_FLOW):
                self._set_state(job_name, _FLOW[i + 1])
            else:
                self._set_final(job_name, self.final_state)

    def finish(self, name: str | None = None) -> None:
        """Run each (or one) job to its final state, writing its output."""
        for _ in range(len(_FLOW) + 1):
            self.step(name)

    def run_to(self, state: str, name: str | None = None) -> None:
        for job_name in [name] if name else list(self.jobs):
            while self.state(job_name) != state and self.state(job_name) not in FINAL_STATES:
                self.step(job_name)

    def job_names(self) -> list[str]:
        with self.lock:
            return list(self.jobs)

    # ------------------------------------------------------------------ state changes

    def _set_state(self, name: str, state: str) -> None:
        with self.lock:
            job = self.jobs[name]
            job.state = aiplatform_v1.JobState[f"JOB_STATE_{state}"]
            job.update_time = _now()
            if state == "RUNNING":
                job.start_time = _now()

    def _set_final(self, name: str, state: str) -> None:
        with self.lock:
            job = self.jobs[name]
        if state in ("SUCCEEDED", "PARTIALLY_SUCCEEDED") or self.export_fraction is not None:
            # A terminated job still exports (and bills) the rows it completed (issue 10).
            fraction = None if state in ("SUCCEEDED", "PARTIALLY_SUCCEEDED") else self.export_fraction
            ok, failed, incomplete = self._write_output(job, fraction)
            with self.lock:
                job.completion_stats.successful_count = ok
                job.completion_stats.failed_count = failed
                job.completion_stats.incomplete_count = incomplete
        if state in ("SUCCEEDED", "PARTIALLY_SUCCEEDED"):
            pass
        elif state == "FAILED":
            job.error.code = 13
            job.error.message = "fake: the job failed"
        elif state == "EXPIRED":
            job.error.code = 4
            job.error.message = "fake: the job expired in the queue"
        elif state == "CANCELLED":
            job.error.code = 1
            job.error.message = "fake: the job was cancelled"
        with self.lock:
            job.state = aiplatform_v1.JobState[f"JOB_STATE_{state}"]
            job.end_time = job.update_time = _now()

    # ------------------------------------------------------------------ output

    def _write_output(self, job: aiplatform_v1.BatchPredictionJob,
                      fraction: float | None = None) -> tuple[int, int, int]:
        prefix = job.output_config.gcs_destination.output_uri_prefix
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        folder = prefix.rstrip("/") + f"/prediction-model-{stamp}/"
        bucket_name, _, base = folder[5:].partition("/")
        bucket = self.storage.bucket(bucket_name)
        job.output_info.gcs_output_directory = folder

        every = [ln for uri in job.input_config.gcs_source.uris for ln in self._read_lines(uri)]
        with self.lock:
            self.sent.setdefault(job.name, [_text(orjson.loads(raw)) for raw in every])
        lines: Iterator[bytes] = iter(every)
        incomplete = 0
        if fraction is not None:  # the job ended early: only its first rows were completed
            done = int(len(every) * fraction)
            lines, incomplete = iter(every[:done]), len(every) - done
        if self.shuffle:
            buffered = list(lines)
            random.Random(len(buffered)).shuffle(buffered)
            lines = iter(buffered)
        names = ["predictions.jsonl"] if self.split <= 1 else \
            [f"predictions_{i:04d}.jsonl" for i in range(1, self.split + 1)]
        writers = [bucket.blob(base + n).open("wb", chunk_size=8 * 1024 * 1024) for n in names]
        to_errors = self.errors_file or self.error_shape in ("errors_file", "bare_instance")
        errors = bucket.blob(base + "errors_0001.jsonl").open("wb") if to_errors else None
        copies = bucket.blob(base + "incremental_predictions/predictions_0001.jsonl").open("wb") \
            if self.incremental else None
        dims_default = int(dict(job.model_parameters or {}).get("outputDimensionality", 768)) \
            if job.model_parameters else 768
        ok = failed = 0
        try:
            for i in range(self.malformed):
                writers[0].write(b'{"instance": {"content": "trunc' if i % 2 == 0 else b"not json at all\n")
                writers[0].write(b"\n")
            for i, raw in enumerate(lines):
                obj = orjson.loads(raw)
                text, out, err_out = self._answer(obj, dims_default)
                if self.drop(text):
                    continue
                if err_out is not None:
                    failed += 1
                    (errors or writers[i % len(writers)]).write(orjson.dumps(err_out) + b"\n")
                else:
                    ok += 1
                    writers[i % len(writers)].write(orjson.dumps(out) + b"\n")
                    with self.lock:
                        self._clock += 1
                        self.answered.setdefault(text, self._clock)
                if copies is not None:
                    copies.write(orjson.dumps(out if err_out is None else err_out) + b"\n")
        finally:
            for w in writers:
                w.close()
            for f in (errors, copies):
                if f is not None:
                    f.close()
        return ok, failed, incomplete

    def _answer(self, obj: dict[str, Any], dims_default: int) -> tuple[str, Any, Any]:
        """(text, success line, error line) for one input line; exactly one of the lines is set."""
        shape = "errors_file" if self.errors_file and self.error_shape == "status" else self.error_shape
        if "request" in obj:  # Gemini
            req = obj["request"]
            text = req["content"]["parts"][0]["text"]
            dims = self.output_dims or int(req.get("embed_content_config", {}).get("output_dimensionality", 3072))
            reason = self.fail(text)
            if reason:
                if shape == "status_only":
                    return text, None, {"key": obj["key"], "request": req, "error": {"status": reason}}
                if shape in ("errors_file", "bare_instance"):
                    return text, None, {"key": obj["key"], "request": req, "error": {"code": 3, "message": reason}}
                return text, None, {"key": obj["key"], "request": req, "status": reason, "response": {}}
            values = _unit(fake_values(text, 3072)) if self.gemini_parent else fake_values(text, dims)
            resp: dict[str, Any] = {"embedding": {"values": values}}
            if self.token_count_string:
                resp["tokenCount"] = str(len(text.split()))
            return text, {"key": obj["key"], "request": req, "response": resp, "status": ""}, None
        text = obj["content"]
        dims = self.output_dims or dims_default
        instance = dict(obj) if self.echo_unknown else {"content": text}
        if self.echo_task == "drop":
            instance.pop("task_type", None)
        elif self.echo_task == "lower" and "task_type" in instance:
            instance["task_type"] = instance["task_type"].lower()
        elif self.echo_task == "camel" and "task_type" in instance:
            instance["taskType"] = instance.pop("task_type")
        if self.mangle_echo is not None:
            instance["content"] = self.mangle_echo(text)
        reason = self.fail(text)
        if reason:
            if shape == "bare_instance":
                return text, None, dict(instance, error={"code": 3, "message": reason})
            if shape == "status_only":
                return text, None, {"instance": instance, "error": {"status": reason}}
            if shape == "errors_file":
                return text, None, {"instance": instance, "error": {"code": 3, "message": reason}}
            return text, None, {"instance": instance, "predictions": [], "status": reason}
        truncated = self.truncate(text)
        pred = {"embeddings": {"statistics": {"token_count": 2048 if truncated else len(text.split()),
                                              "truncated": truncated},
                               "values": fake_values(text, dims)}}
        if self.singular_prediction:
            return text, {"instance": instance, "prediction": pred, "status": ""}, None
        return text, {"instance": instance, "predictions": [pred], "status": ""}, None

    def _read_lines(self, uri: str) -> Iterator[bytes]:
        bucket_name, _, name = uri[5:].partition("/")
        with self.storage.bucket(bucket_name).blob(name).open("rb", chunk_size=4 * 1024 * 1024) as f:
            rest = b""
            while True:
                block = f.read(4 * 1024 * 1024)
                if not block:
                    break
                parts = (rest + block).split(b"\n")
                rest = parts.pop()
                yield from (p for p in parts if p.strip())
            if rest.strip():
                yield rest

    # ------------------------------------------------------------------ request handlers

    def create(self, parent: str, body: bytes) -> aiplatform_v1.BatchPredictionJob:
        job = aiplatform_v1.BatchPredictionJob.from_json(body.decode(), ignore_unknown_fields=True)
        if not job.model.startswith("publishers/google/models/"):
            raise _HTTPError(400, f"fake: unsupported model {job.model!r}")
        if job.input_config.instances_format != "jsonl" or not job.input_config.gcs_source.uris:
            raise _HTTPError(400, "fake: input must be jsonl in Cloud Storage")
        with self.lock:
            self._seq += 1
            job.name = f"{parent}/batchPredictionJobs/{1000 + self._seq}"
            job.state = aiplatform_v1.JobState.JOB_STATE_QUEUED
            job.create_time = job.update_time = _now()
            self.jobs[job.name] = job
            self._clock += 1
            self.created[job.name] = self._clock
        return job

    def list(self, parent: str, query: dict[str, str]) -> dict[str, Any]:
        terms = [t.strip() for t in query.get("filter", "").split(" AND ") if t.strip()]
        conds: list[tuple[str, str]] = []
        for term in terms:
            field, sep, value = term.partition("=")
            if not sep:
                raise _HTTPError(400, f"fake: unsupported filter term {term!r}")
            conds.append((field.strip(), value.strip().strip('"')))
        with self.lock:
            jobs = [j for n, j in self.jobs.items() if n.startswith(parent + "/")]
        out = []
        for j in jobs:
            okay = True
            for field, value in conds:
                if field.startswith("labels."):
                    okay &= dict(j.labels).get(field[7:]) == value
                elif field == "display_name":
                    okay &= j.display_name == value
                elif field == "state":
                    okay &= j.state.name == value
                else:
                    raise _HTTPError(400, f"fake: unsupported filter field {field!r}")
            if okay:
                out.append(j)
        size = min(int(query.get("pageSize") or 100), self.max_page_size)
        start = int(query.get("pageToken") or 0)
        page = out[start:start + size]
        body: dict[str, Any] = {"batchPredictionJobs": [_job_dict(j) for j in page]}
        if start + size < len(out):
            body["nextPageToken"] = str(start + size)
        return body

    def cancel(self, name: str) -> None:
        with self.lock:
            job = self.jobs.get(name)
            if job is None:
                raise _HTTPError(404, f"fake: {name} not found")
            st = job.state.name.removeprefix("JOB_STATE_")
            if st in FINAL_STATES:
                raise _HTTPError(400, f"fake: job {name} is already {st}", "FAILED_PRECONDITION")
        if self.cancel_lag:
            self._set_state(name, "CANCELLING")
            return
        self._set_final(name, "CANCELLED")

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        dims = self.output_dims or int((body.get("parameters") or {}).get("outputDimensionality", 768))
        preds = [{"embeddings": {"values": fake_values(inst["content"], dims),
                                 "statistics": {"token_count": 1, "truncated": False}}}
                 for inst in body.get("instances", [])]
        return {"predictions": preds, "deployedModelId": "", "model": "", "modelVersionId": ""}


def _text(line: dict[str, Any]) -> str:
    """The text of one input line of either family."""
    return str(line["request"]["content"]["parts"][0]["text"] if "request" in line else line["content"])


def _job_dict(job: aiplatform_v1.BatchPredictionJob) -> dict[str, Any]:
    return json.loads(aiplatform_v1.BatchPredictionJob.to_json(job, use_integers_for_enums=False))


class _HTTPError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None):
        super().__init__(message)
        self.code, self.body = code, error_body(code, message, status)


class _Handler(JsonHandler):
    fake: FakeVertex

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        body = self.read_body()
        path = urllib.parse.unquote(url.path)
        fake = self.fake
        if not path.startswith("/v1/"):
            return self._error(_HTTPError(404, f"fake: no route {path}"))
        path = path[4:]
        op, target = _route(method, path)
        fake.record(op, path)
        if self.answered_fault(op):
            return None
        try:
            if op == "create":
                job = fake.create(target, body)
                with fake.lock:
                    lose = fake.lose_create > 0
                    if lose:
                        fake.lose_create -= 1
                if lose:
                    if fake.lose_create_mode == "reset":
                        self.close_connection = True
                        self.connection.close()
                        return None
                    return self._error(_HTTPError(503, "fake: the create response was lost"))
                return self._json(_job_dict(job))
            if op == "list":
                return self._json(fake.list(target, query))
            if op == "get":
                if fake.auto_finish and target in fake.jobs and fake.state(target) not in FINAL_STATES:
                    fake.finish(target)
                with fake.lock:
                    job = fake.jobs.get(target)
                    if job is None:
                        raise _HTTPError(404, f"fake: {target} not found")
                    return self._json(_job_dict(job))
            if op == "cancel":
                fake.cancel(target)
                return self._json({})
            if op == "predict":
                return self._json(fake.predict(json.loads(body or b"{}")))
            raise _HTTPError(404, f"fake: no route {method} {path}")
        except _HTTPError as e:
            return self._error(e)

    def _json(self, obj: Any) -> None:
        self.send(200, obj)

    def _error(self, e: _HTTPError) -> None:
        self.send(e.code, e.body)


def _route(method: str, path: str) -> tuple[str, str]:
    """('create'|'list'|'get'|'cancel'|'predict'|'unknown', resource) for a path after /v1/."""
    if path.endswith(":cancel") and method == "POST":
        return "cancel", path[: -len(":cancel")]
    if path.endswith(":predict") and method == "POST":
        return "predict", path[: -len(":predict")]
    if path.endswith("/batchPredictionJobs"):
        return ("create" if method == "POST" else "list"), path[: -len("/batchPredictionJobs")]
    if "/batchPredictionJobs/" in path and method == "GET":
        return "get", path
    return "unknown", path
