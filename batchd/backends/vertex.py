"""Vertex AI batch prediction + Cloud Storage: the Backend protocol on Google's batch embedding jobs.

A batch is staged as ``<staging_uri>/<instance_id>/batch-<id>/input.jsonl``; the job writes under
``.../batch-<id>/output/``. Jobs carry the labels ``batchd-instance`` and ``batchd-batch`` so a job whose
create response was lost is found again (:meth:`VertexBackend.find_job`). Both model families of VERTEX.md
are spoken (the line formats live in :mod:`batchd.backends.vertex_lines`). Output is read file by file,
line by line, so memory does not grow with the job.

Every remote call has a timeout and retries 429 / 5xx / dropped connections with exponential backoff and
jitter (``vertex.retry_backoff`` .. ``vertex.retry_deadline``). The one exception is the job create, which is
not idempotent: after an ambiguous failure it looks for the job by its labels instead of creating again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from batchd.backends import (
    BackendError,
    CheckResult,
    Item,
    JobInfo,
    JobState,
    PermanentError,
    Progress,
    ResultLine,
    _noop,
)
from batchd.backends.vertex_lines import LineFormat, embedding_values, float32_blob
from batchd.faults import crash_point

if TYPE_CHECKING:  # pragma: no cover
    from batchd.config import Config

log = structlog.get_logger("batchd.vertex")

UPLOAD_BLOCK = 4 * 1024 * 1024  # resumable upload chunk (a multiple of 256 KiB); progress() once per block
READ_BLOCK = 4 * 1024 * 1024  # bytes per ranged read of an output file
PROGRESS_LINES = 1000  # result lines between progress() calls
LABEL_INSTANCE = "batchd-instance"
LABEL_BATCH = "batchd-batch"
CLASSIC_DEFAULT_DIMENSIONS = 768
_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


class SetupError(BackendError):
    """Settings or credentials are missing or unusable.

    Deliberately not a PermanentError: the operator fixes the setup and batches proceed, without their
    chunks having burnt attempts meanwhile (they wait, PENDING, with this message on their batch).
    """


class VertexBackend:
    """Embeds batches with Vertex AI batch prediction jobs. Clients are built on first use."""

    def __init__(self, config: Config, instance_id: str):
        self.config = config
        self.instance_id = instance_id
        emb, vx = config.embedding, config.vertex
        self.model, self.task_type, self.dimensions = emb.model, emb.task_type, emb.dimensions
        self.gemini = emb.family == "gemini"
        self.lines = LineFormat(self.model, self.task_type, self.dimensions)
        self.project, self.location = vx.project, vx.location
        self.bucket_name = vx.bucket
        self.root = "/".join(p for p in (vx.prefix, instance_id) if p)  # object prefix of this instance
        self.timeout = float(vx.request_timeout)
        self._jobs_client: Any = None
        self._predict_client: Any = None
        self._storage_client: Any = None
        self._credentials: Any = None

    # ------------------------------------------------------------------ names

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    def batch_prefix(self, batch_id: int) -> str:
        return f"{self.root}/batch-{batch_id}/"

    def input_uri(self, batch_id: int) -> str:
        return f"gs://{self.bucket_name}/{self.batch_prefix(batch_id)}input.jsonl"

    def output_prefix(self, batch_id: int) -> str:
        return f"gs://{self.bucket_name}/{self.batch_prefix(batch_id)}output/"

    def _labels(self, batch_id: int) -> dict[str, str]:
        return {LABEL_INSTANCE: self.instance_id, LABEL_BATCH: str(batch_id)}

    # ------------------------------------------------------------------ clients

    def _require_settings(self) -> None:
        from batchd.config import vertex_missing

        missing = vertex_missing(self.config)
        if missing:
            raise SetupError("; ".join(missing))

    def _creds(self) -> Any:
        if self._credentials is None:
            self._credentials = load_credentials(self.config.vertex.credentials)
        return self._credentials

    def _client_options(self) -> tuple[str, Any]:
        from google.api_core.client_options import ClientOptions

        endpoint = self.config.vertex.api_endpoint or f"{self.location}-aiplatform.googleapis.com"
        # The REST transport keeps an explicit http:// scheme (emulators); gRPC cannot reach such a fake.
        return "rest", ClientOptions(api_endpoint=endpoint)

    @property
    def jobs(self) -> Any:
        if self._jobs_client is None:
            self._require_settings()
            from google.cloud import aiplatform_v1

            transport, options = self._client_options()
            self._jobs_client = aiplatform_v1.JobServiceClient(
                transport=transport, credentials=self._creds(), client_options=options)
        return self._jobs_client

    @property
    def storage(self) -> Any:
        if self._storage_client is None:
            self._require_settings()
            import os

            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            if os.environ.get("STORAGE_EMULATOR_HOST") or self.config.vertex.credentials == "anonymous":
                creds: Any = AnonymousCredentials()
            else:
                creds = self._creds()
            self._storage_client = storage.Client(project=self.project, credentials=creds)
        return self._storage_client

    @property
    def bucket(self) -> Any:
        return self.storage.bucket(self.bucket_name)

    def _retry(self, *, create: bool = False) -> Any:
        """Exponential backoff with jitter on 429/5xx/connection errors; a create retries only 429s."""
        from google.api_core import retry as r

        vx = self.config.vertex
        predicate = _retry_create if create else _retryable
        return r.Retry(predicate=predicate, initial=float(vx.retry_backoff),
                       maximum=max(float(vx.retry_backoff), min(60.0, float(vx.retry_deadline) / 4)),
                       multiplier=2.0, timeout=float(vx.retry_deadline))

    def _quick_retry(self) -> Any:
        """For `batchd check`: an operator is waiting, so give up after 10 s at most."""
        from google.api_core import retry as r

        vx = self.config.vertex
        deadline = min(10.0, float(vx.retry_deadline))
        return r.Retry(predicate=_retryable, initial=min(float(vx.retry_backoff), deadline / 4),
                       maximum=deadline / 4, timeout=deadline)

    # ------------------------------------------------------------------ submit

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = _noop) -> str:
        """Upload the batch's JSONL (kept if already there) and create its job; return the job name.

        A 400/403/404 from the service raises PermanentError with its message. After an ambiguous create
        failure (5xx, dropped connection) the job is looked up by its labels: adopted if it exists,
        otherwise a BackendError asks the caller to try again later.
        """
        self._require_settings()
        lines = self._upload_input(batch_id, items, progress)
        crash_point("submit.uploaded")
        job = self._job_spec(batch_id)
        from google.api_core import exceptions as gexc

        try:
            created = self.jobs.create_batch_prediction_job(
                parent=self.parent, batch_prediction_job=job, retry=self._retry(create=True), timeout=self.timeout)
        except (gexc.BadRequest, gexc.Forbidden, gexc.NotFound, gexc.Unauthorized, gexc.MethodNotAllowed) as e:
            raise PermanentError(_message(e)) from None
        except Exception as e:  # noqa: BLE001 - ambiguous: the job may exist remotely
            if not _retryable(e) and not isinstance(e, gexc.RetryError):
                raise BackendError(_message(e)) from None
            log.warning("job.create_ambiguous", batch_id=batch_id, error=_message(e))
            found = self.find_job(batch_id)
            if found:
                log.info("job.create_adopted", batch_id=batch_id, google_job_id=found)
                return found
            raise BackendError(f"creating the job failed: {_message(e)}") from None
        log.info("job.created", batch_id=batch_id, google_job_id=created.name, lines=lines, model=self.model)
        return str(created.name)

    def _upload_input(self, batch_id: int, items: Iterable[Item], progress: Progress) -> int:
        """Stream items into input.jsonl. An object left by an earlier attempt is kept (ifGenerationMatch=0)."""
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self.batch_prefix(batch_id) + "input.jsonl")
        lines = 0
        try:
            with blob.open("wb", chunk_size=UPLOAD_BLOCK, if_generation_match=0, content_type="application/jsonl",
                           timeout=self.timeout, retry=self._retry()) as f:
                pending = 0
                for item in items:
                    data = self.lines.input_line(item)
                    f.write(data)
                    lines += 1
                    pending += len(data)
                    if pending >= UPLOAD_BLOCK:
                        pending = 0
                        progress()
        except Exception as e:  # sorted by HTTP status below
            # The resumable writer raises the media library's InvalidResponse, not api_core's exceptions.
            status = getattr(e, "code", None) if isinstance(e, gexc.GoogleAPICallError) else \
                getattr(getattr(e, "response", None), "status_code", None)
            if status == 412:  # ifGenerationMatch=0: an earlier attempt already staged this batch
                log.info("batch.input_exists", batch_id=batch_id, uri=self.input_uri(batch_id))
            elif status in (401, 403, 404):
                raise PermanentError(f"cannot write {self.input_uri(batch_id)}: {_message(e)}") from None
            else:
                raise
        progress()
        return lines

    def _job_spec(self, batch_id: int) -> Any:
        from google.cloud import aiplatform_v1

        job = aiplatform_v1.BatchPredictionJob(
            display_name=f"batchd-{self.instance_id}-{batch_id}",
            model=f"publishers/google/models/{self.model}",
            input_config={"instances_format": "jsonl", "gcs_source": {"uris": [self.input_uri(batch_id)]}},
            output_config={"predictions_format": "jsonl",
                           "gcs_destination": {"output_uri_prefix": self.output_prefix(batch_id)}},
            labels=self._labels(batch_id),
        )
        if not self.gemini and self.dimensions != CLASSIC_DEFAULT_DIMENSIONS:
            # Classic models take the size as a model parameter (Gemini lines carry it per request).
            job.model_parameters = {"outputDimensionality": self.dimensions}
        return job

    # ------------------------------------------------------------------ find / status / cancel

    def find_job(self, batch_id: int) -> str | None:
        """The job labelled with this instance and batch (all pages read), or None.

        With several (a create retried by hand), the oldest one not failed wins.
        """
        flt = f'labels.{LABEL_BATCH}="{batch_id}" AND labels.{LABEL_INSTANCE}="{self.instance_id}"'
        pager = self.jobs.list_batch_prediction_jobs(
            request={"parent": self.parent, "filter": flt, "page_size": 100},
            retry=self._retry(), timeout=self.timeout)
        found = []
        for job in pager:
            labels = dict(job.labels)
            if labels.get(LABEL_BATCH) == str(batch_id) and labels.get(LABEL_INSTANCE) == self.instance_id:
                found.append(job)
        if not found:
            return None
        bad = {JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED, JobState.CANCELLING}
        found.sort(key=lambda j: (_state(j.state) in bad, _ts(j.create_time)))
        return str(found[0].name)

    def status(self, job_name: str) -> JobInfo:
        job = self._get(job_name)
        stats = job.completion_stats
        output = job.output_info.gcs_output_directory or None
        return JobInfo(
            name=job.name, state=_state(job.state),
            error=(job.error.message or f"code {job.error.code}") if job.error.code or job.error.message else None,
            succeeded=int(stats.successful_count) if stats else None,
            failed=int(stats.failed_count) if stats else None,
            output=output)

    def _get(self, job_name: str) -> Any:
        from google.api_core import exceptions as gexc

        try:
            return self.jobs.get_batch_prediction_job(name=job_name, retry=self._retry(), timeout=self.timeout)
        except gexc.NotFound as e:
            raise PermanentError(f"job {job_name} not found: {_message(e)}") from None

    def cancel(self, job_name: str) -> None:
        """Best effort: a job already final (400/409 FAILED_PRECONDITION) or gone is not an error."""
        from google.api_core import exceptions as gexc

        try:
            self.jobs.cancel_batch_prediction_job(name=job_name, retry=self._retry(), timeout=self.timeout)
        except (gexc.FailedPrecondition, gexc.NotFound, gexc.BadRequest, gexc.Conflict) as e:
            log.info("job.cancel_ignored", google_job_id=job_name, error=_message(e))
            return
        log.info("job.cancel_requested", google_job_id=job_name)

    # ------------------------------------------------------------------ results

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        """Every result line of the job's output folder, file by file, line by line (bounded memory)."""
        job = self._get(job_name)
        folder = job.output_info.gcs_output_directory or job.output_config.gcs_destination.output_uri_prefix
        bucket, prefix = _split_gs(folder)
        if not prefix.endswith("/"):
            prefix += "/"
        blobs = sorted(b.name for b in self.storage.list_blobs(bucket, prefix=prefix, retry=self._retry(),
                                                               timeout=self.timeout)
                       if b.name.endswith(".jsonl"))
        log.debug("job.output_files", google_job_id=job_name, files=len(blobs))
        n = 0
        for name in blobs:
            blob = self.storage.bucket(bucket).blob(name)
            for lineno, raw in enumerate(self._read_lines(blob), 1):
                n += 1
                if n % PROGRESS_LINES == 0:
                    progress()
                if not raw.strip():
                    continue
                result = self.lines.parse(raw)
                if result is None:
                    log.warning("job.output_malformed", google_job_id=job_name, file=name, line=lineno)
                    continue
                yield result
        progress()

    def _read_lines(self, blob: Any) -> Iterator[bytes]:
        # Split blocks into lines ourselves: BlobReader's own readline() reads one byte per call.
        rest = b""
        for block in self._read_blocks(blob):
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest

    def _read_blocks(self, blob: Any) -> Iterator[bytes]:
        """The object's bytes in READ_BLOCK pieces from one streaming GET.

        A 429/5xx or a connection dropped mid-way resumes at the byte reached (Range), with backoff, until
        vertex.retry_deadline. (Reading through BlobReader/download_as_bytes goes through the client's 8 KiB
        loop, which cost as much CPU as parsing the lines: sync ran ~1.5x slower; see bench/.)
        """
        import random
        import time

        import urllib3
        from google.api_core import exceptions as gexc

        vx = self.config.vertex
        if not blob.media_link:
            blob.reload(timeout=self.timeout, retry=self._retry())
        offset, delay = 0, float(vx.retry_backoff)
        deadline = time.monotonic() + float(vx.retry_deadline)
        while True:
            try:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                with self.storage._http.get(blob.media_link, headers=headers, stream=True,
                                            timeout=self.timeout) as resp:
                    if resp.status_code == 416 and offset:
                        return  # the connection dropped right after the last byte
                    if resp.status_code >= 400:
                        raise gexc.from_http_response(resp)
                    skip = offset if resp.status_code != 206 else 0  # the server ignored the Range
                    while True:
                        block = resp.raw.read(READ_BLOCK, decode_content=True)
                        if not block:
                            return
                        if skip:
                            cut = min(skip, len(block))
                            block, skip = block[cut:], skip - cut
                            if not block:
                                continue
                        offset += len(block)
                        yield block
            except (urllib3.exceptions.HTTPError, OSError, gexc.GoogleAPICallError) as e:
                if not (_retryable(e) or isinstance(e, (urllib3.exceptions.HTTPError, OSError))) \
                        or time.monotonic() + delay > deadline:
                    raise
                log.warning("job.output_read_retry", file=blob.name, offset=offset, error=_message(e))
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 60.0)

    # ------------------------------------------------------------------ cleanup / check / query

    def cleanup(self, batch_id: int, job_name: str) -> None:
        """Delete the batch's staged input and output objects (when vertex.cleanup). Idempotent."""
        if not self.config.vertex.cleanup:
            return
        from google.api_core import exceptions as gexc

        deleted = 0
        for blob in self.storage.list_blobs(self.bucket_name, prefix=self.batch_prefix(batch_id),
                                            retry=self._retry(), timeout=self.timeout):
            try:
                blob.delete(timeout=self.timeout, retry=self._retry())
                deleted += 1
            except gexc.NotFound:
                pass
        log.info("batch.cleaned_up", batch_id=batch_id, google_job_id=job_name, objects=deleted)

    def close(self) -> None:
        """Release the HTTP sessions (the clients are built again on next use)."""
        for client in (self._jobs_client, self._predict_client):
            if client is not None:
                client.transport.close()
        if self._storage_client is not None:
            self._storage_client.close()
        self._jobs_client = self._predict_client = self._storage_client = None

    def check(self) -> list[CheckResult]:
        """Settings, credentials, bucket writable, JobService answering: one CheckResult each."""
        from batchd.config import vertex_missing

        missing = vertex_missing(self.config)
        if missing:
            return [CheckResult("vertex settings", False, "; ".join(missing))]
        out = [CheckResult("vertex settings", True, f"project {self.project}, {self.location}, model {self.model}")]
        try:
            self._creds()
            out.append(CheckResult("credentials", True, self.config.vertex.credentials))
        except Exception as e:  # noqa: BLE001
            return out + [CheckResult("credentials", False, _message(e))]
        out.append(self._check_bucket())
        out.append(self._check_jobs())
        return out

    def _check_bucket(self) -> CheckResult:
        name = f"bucket gs://{self.bucket_name}"
        probe = f"{self.root}/.batchd-check"
        retry = self._quick_retry()
        try:
            blob = self.bucket.blob(probe)
            blob.upload_from_string(b"ok\n", timeout=self.timeout, retry=retry)
            blob.delete(timeout=self.timeout, retry=retry)
        except Exception as e:  # noqa: BLE001
            return CheckResult(name, False, f"cannot write and delete {probe}: {_message(e)}")
        return CheckResult(name, True, f"wrote and deleted gs://{self.bucket_name}/{probe}")

    def _check_jobs(self) -> CheckResult:
        name = "vertex job service"
        try:
            pager = self.jobs.list_batch_prediction_jobs(
                request={"parent": self.parent, "page_size": 1}, retry=self._quick_retry(), timeout=self.timeout)
            next(iter(pager.pages), None)
        except Exception as e:  # noqa: BLE001
            return CheckResult(name, False, f"listing batch prediction jobs in {self.parent} failed: {_message(e)}")
        return CheckResult(name, True, f"listed batch prediction jobs in {self.parent}")

    def embed_query(self, text: str) -> bytes:
        """Embed one search query online (task RETRIEVAL_QUERY) with the configured model."""
        from google.api_core import exceptions as gexc
        from google.protobuf import json_format, struct_pb2

        if self._predict_client is None:
            self._require_settings()
            from google.cloud import aiplatform_v1

            transport, options = self._client_options()
            self._predict_client = aiplatform_v1.PredictionServiceClient(
                transport=transport, credentials=self._creds(), client_options=options)
        instance = json_format.ParseDict({"content": text, "task_type": "RETRIEVAL_QUERY"}, struct_pb2.Value())
        params = json_format.ParseDict({"outputDimensionality": self.dimensions, "autoTruncate": True},
                                       struct_pb2.Value())
        try:
            resp = self._predict_client.predict(
                endpoint=f"{self.parent}/publishers/google/models/{self.model}", instances=[instance],
                parameters=params, retry=self._retry(), timeout=self.timeout)
        except (gexc.BadRequest, gexc.Forbidden, gexc.NotFound) as e:
            raise PermanentError(_message(e)) from None
        preds = [json_format.MessageToDict(p) for p in resp._pb.predictions]
        values, _ = embedding_values({"predictions": preds})
        if values is None or len(values) != self.dimensions:
            raise BackendError(f"the online prediction returned no {self.dimensions}-dimension embedding")
        return float32_blob(values)


# ---------------------------------------------------------------------- helpers


def load_credentials(spec: str) -> Any:
    """"default" (ADC), "anonymous", or a service-account JSON file. Raises SetupError with a clear line."""
    if spec == "anonymous":
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    if spec == "default":
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            creds, _ = google.auth.default(scopes=list(_SCOPES))
        except DefaultCredentialsError as e:
            raise SetupError(f"vertex.credentials = \"default\" but no Application Default Credentials: "
                                 f"{str(e).splitlines()[0]}") from None
        return creds
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_file(spec, scopes=list(_SCOPES))
    except FileNotFoundError:
        raise SetupError(f"vertex.credentials: {spec} does not exist") from None
    except (OSError, ValueError, KeyError) as e:
        raise SetupError(f"vertex.credentials: {spec} is not a usable service-account JSON file: {e}") from None


def _retryable(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    if isinstance(exc, (gexc.TooManyRequests, gexc.ResourceExhausted, gexc.InternalServerError,
                        gexc.BadGateway, gexc.ServiceUnavailable, gexc.GatewayTimeout, gexc.DeadlineExceeded)):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))


def _retry_create(exc: BaseException) -> bool:
    """A create is retried only when the server surely did nothing (rate limited)."""
    from google.api_core import exceptions as gexc

    return isinstance(exc, (gexc.TooManyRequests, gexc.ResourceExhausted))


def _state(value: Any) -> JobState:
    name = getattr(value, "name", None) or str(value)
    name = name.removeprefix("JOB_STATE_")
    try:
        return JobState(name)
    except ValueError:
        return JobState.UNKNOWN


def _ts(value: Any) -> float:
    try:
        return float(value.timestamp())
    except Exception:  # noqa: BLE001 - unset timestamps sort first
        return 0.0


def _split_gs(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise BackendError(f"job output {uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


def _message(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if resp is not None and hasattr(resp, "status_code") and not hasattr(e, "message"):
        # The storage media library's InvalidResponse: take the server's own message from the body.
        try:
            detail = resp.json()["error"]["message"]
        except Exception:  # noqa: BLE001
            detail = (getattr(resp, "text", "") or "")[:200]
        return f"{resp.status_code} {' '.join(str(detail).split())}".strip()
    msg = getattr(e, "message", None) or str(e)
    code = getattr(e, "code", None)
    text = " ".join(str(msg).split())[:500]
    return f"{int(code)} {text}" if isinstance(code, int) and not text.startswith(str(code)) else text


__all__ = ["SetupError", "VertexBackend", "load_credentials"]
