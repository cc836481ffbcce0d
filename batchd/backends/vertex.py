"""Vertex AI batch prediction + Cloud Storage: the Backend protocol on Google's batch embedding jobs.

A batch is staged as ``<staging_uri>/<instance_id>/batch-<id>/input.jsonl``; the job writes under
``.../batch-<id>/output/``. Jobs carry the labels ``batchd-instance`` and ``batchd-batch`` so a job whose
create response was lost is found again (:meth:`VertexBackend.find_job`). Both model families of VERTEX.md
are spoken (the line formats live in :mod:`batchd.backends.vertex_lines`). Output is read file by file,
line by line, so memory does not grow with the job.

This module is the JobService side (create, find, status, cancel, the online query embedding, check); the
objects in Cloud Storage are :mod:`batchd.backends.vertex_storage`'s. Every remote call has a timeout and
retries 429 / 5xx / dropped connections with exponential backoff and jitter (:mod:`batchd.backends.vertex_common`).
The one exception is the job create, which is not idempotent: after an ambiguous failure it looks for the job
by its labels instead of creating again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from batchd.backends import (
    BackendContext,
    BackendError,
    CheckResult,
    Item,
    JobInfo,
    JobState,
    PermanentError,
    Progress,
    ResultLine,
    SetupError,
    _noop,
)
from batchd.backends.models import CLASSIC, family_of
from batchd.backends.vertex_common import (
    load_credentials,
    make_retry,
    message,
    quick_retry,
    retryable,
)
from batchd.backends.vertex_lines import LineFormat, embedding_of
from batchd.backends.vertex_storage import RAW_BLOCK, VertexStorage
from batchd.faults import crash_point
from batchd.logs import MalformedLines
from batchd.vectors import VectorError, fit_vector

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends.vertex_settings import VertexSettings

log = structlog.get_logger("batchd.vertex")

PROGRESS_LINES = 1000  # result lines between progress() calls
# Where Gemini embedding batch jobs run. Source: Vertex AI docs, "Batch prediction for Gemini embeddings" /
# "Gemini embedding model locations", as of 2026-11 (VERTEX.md). Not a hard rule: Google adds regions, so
# `check` only warns.
GEMINI_BATCH_REGIONS = ("us-central1", "us-east4", "us-west1", "us-west4", "europe-west1", "europe-west4")
LABEL_INSTANCE = "batchd-instance"
LABEL_BATCH = "batchd-batch"


class VertexBackend:
    """Embeds batches with Vertex AI batch prediction jobs. Clients are built on first use.

    Constructed from ``[vertex]`` and the context alone; settings it cannot work without (project, bucket) are
    :attr:`missing_settings`: construction succeeds, ``check`` reports them, and every remote call raises
    SetupError (batches wait, no attempt burnt, until the operator sets them).
    """

    def __init__(self, settings: VertexSettings, context: BackendContext):
        self.settings, self.instance_id = settings, context.instance_id
        self.model, self.task_type, self.dimensions = context.model, context.task_type, context.dimensions
        self.missing_settings = tuple(settings.missing())  # the one place that asks; see _require_settings
        self.family = family_of(self.model)
        self.gemini = self.family.name == "gemini"
        self.lines = LineFormat(self.model, self.task_type, self.dimensions)
        self.project, self.location = settings.project, settings.location
        self.bucket_name = settings.bucket
        self.root = "/".join(p for p in (settings.prefix, self.instance_id) if p)  # object prefix of this instance
        self.timeout = float(settings.request_timeout)
        self._jobs_client: Any = None
        self._predict_client: Any = None
        self._credentials: Any = None
        self.gcs = VertexStorage(settings, self._creds)

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
        """Raise SetupError naming every key in :attr:`missing_settings` (one line, ``; `` between them)."""
        if self.missing_settings:
            raise SetupError("; ".join(self.missing_settings))

    def _creds(self) -> Any:
        if self._credentials is None:
            self._credentials = load_credentials(self.settings.credentials)
        return self._credentials

    def _client_options(self) -> tuple[str, Any]:
        from google.api_core.client_options import ClientOptions

        endpoint = self.settings.api_endpoint or f"{self.location}-aiplatform.googleapis.com"
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

    def _retry(self, *, create: bool = False) -> Any:
        return make_retry(self.settings, create=create)

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
            raise PermanentError(message(e)) from None
        except Exception as e:  # noqa: BLE001 - ambiguous: the job may exist remotely
            if not retryable(e) and not isinstance(e, gexc.RetryError):
                raise BackendError(message(e)) from None
            log.warning("job.create_ambiguous", batch_id=batch_id, error=message(e))
            found = self.find_job(batch_id)
            if found:
                log.info("job.create_adopted", batch_id=batch_id, google_job_id=found)
                return found
            raise BackendError(f"creating the job failed: {message(e)}") from None
        log.info("job.created", batch_id=batch_id, google_job_id=created.name, lines=lines, model=self.model)
        return str(created.name)

    def _upload_input(self, batch_id: int, items: Iterable[Item], progress: Progress) -> int:
        """Stream items into input.jsonl. An object left by an earlier attempt is kept (ifGenerationMatch=0)."""
        return self.gcs.upload_lines(self.batch_prefix(batch_id) + "input.jsonl",
                                     (self.lines.input_line(item) for item in items), progress, batch_id=batch_id)

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
        if not self.gemini and self.dimensions != CLASSIC.default_dimensions:
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
        found.sort(key=lambda j: (JobState.named(j.state, "JOB_STATE_") in bad, _ts(j.create_time)))
        return str(found[0].name)

    def status(self, job_name: str) -> JobInfo:
        job = self._get(job_name)
        stats = job.completion_stats
        output = job.output_info.gcs_output_directory or None
        return JobInfo(
            name=job.name, state=JobState.named(job.state, "JOB_STATE_"),
            error=(job.error.message or f"code {job.error.code}") if job.error.code or job.error.message else None,
            succeeded=int(stats.successful_count) if stats else None,
            failed=int(stats.failed_count) if stats else None,
            output=output)

    def _get(self, job_name: str) -> Any:
        from google.api_core import exceptions as gexc

        try:
            return self.jobs.get_batch_prediction_job(name=job_name, retry=self._retry(), timeout=self.timeout)
        except gexc.NotFound as e:
            raise PermanentError(f"job {job_name} not found: {message(e)}") from None

    def cancel(self, job_name: str) -> None:
        """Best effort: a job already final (400/409 FAILED_PRECONDITION) or gone is not an error."""
        from google.api_core import exceptions as gexc

        try:
            self.jobs.cancel_batch_prediction_job(name=job_name, retry=self._retry(), timeout=self.timeout)
        except (gexc.FailedPrecondition, gexc.NotFound, gexc.BadRequest, gexc.Conflict) as e:
            log.info("job.cancel_ignored", google_job_id=job_name, error=message(e))
            return
        log.info("job.cancel_requested", google_job_id=job_name)

    # ------------------------------------------------------------------ results

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        """Every result line of the job's output folder, file by file, line by line (bounded memory).

        Reads the ``*.jsonl`` files directly in ``output_info.gcs_output_directory`` (results and errors
        files), never subfolders such as ``incremental_predictions/``. A job that names no output folder is
        read from the ``prediction-*`` folders under its output prefix. Works for any final state: a job
        that ended FAILED, CANCELLED or EXPIRED still exports (and bills) the rows it completed. A line tied
        to no row is yielded with no keys (counted as unmatched by the caller).
        """
        n = 0
        malformed = MalformedLines(log, job_name)
        for bucket, name in self._output_objects(job_name):
            for lineno, raw in enumerate(self.gcs.read_lines(bucket, name), 1):
                n += 1
                if n % PROGRESS_LINES == 0:
                    progress()
                if not raw.strip():
                    continue
                result = self.lines.parse(raw)
                if result is None:
                    malformed(name, lineno)
                    result = ResultLine((), error=f"{name}:{lineno}: an output line tied to no row")
                yield result
        progress()

    def result_files(self, job_name: str, progress: Progress = _noop) -> Iterator[tuple[str, Iterator[bytes]]]:
        """The files :meth:`results` reads, as raw bytes in RAW_BLOCK pieces (ranged, resumable reads)."""
        for bucket, name in self._output_objects(job_name):
            yield name, self._blocks(bucket, name, progress)

    def _blocks(self, bucket: str, name: str, progress: Progress) -> Iterator[bytes]:
        for block in self.gcs.read_blocks(self.gcs.client.bucket(bucket).blob(name), RAW_BLOCK):
            progress()
            yield block

    def line_parser(self) -> tuple[str, dict[str, object]]:
        return "batchd.backends.vertex_lines:LineFormat", {
            "model": self.model, "task_type": self.task_type, "dimensions": self.dimensions}

    def _output_objects(self, job_name: str) -> Iterator[tuple[str, str]]:
        """(bucket, object name) of every result file of the job, folder by folder (logged as found)."""
        job = self._get(job_name)
        folder = job.output_info.gcs_output_directory
        folders = [folder] if folder else \
            self.gcs.subfolders(job.output_config.gcs_destination.output_uri_prefix, "prediction-")
        for folder in folders:
            files, skipped = self.gcs.list_output(folder)
            log.debug("job.output_files", google_job_id=job_name, folder=folder, files=[f for _, f in files],
                      skipped=len(skipped))
            if skipped:
                log.info("job.output_skipped", google_job_id=job_name, folder=folder, objects=len(skipped),
                         first=skipped[0])
            yield from files

    def output_files(self, job_name: str) -> list[str]:
        """gs:// URIs of the result files :meth:`results` reads (for ``check --live``)."""
        job = self._get(job_name)
        folder = job.output_info.gcs_output_directory
        folders = [folder] if folder else \
            self.gcs.subfolders(job.output_config.gcs_destination.output_uri_prefix, "prediction-")
        return [f"gs://{b}/{n}" for f in folders for b, n in self.gcs.list_output(f)[0]]

    # ------------------------------------------------------------------ cleanup / check / query

    def cleanup(self, batch_id: int, job_name: str) -> None:
        """Delete the batch's staged input and output objects (when vertex.cleanup). Idempotent."""
        if not self.settings.cleanup:
            return
        self._require_settings()
        deleted = self.gcs.delete_prefix(self.batch_prefix(batch_id))
        log.info("batch.cleaned_up", batch_id=batch_id, google_job_id=job_name, objects=deleted)

    def discard(self, batch_id: int) -> int:
        """Delete everything staged for ``batch_id`` whatever ``vertex.cleanup`` says (``check --live``)."""
        self._require_settings()
        return self.gcs.delete_prefix(self.batch_prefix(batch_id))

    def live_notes(self) -> list[str]:
        """What the first real run should look at (``check --live`` prints these; VERTEX.md has the sources)."""
        notes = ["UNCONFIRMED for batch: a classic output line with a singular `prediction`, errors files whose "
                 "lines are the bare instance plus `error`, and an `error` with only `status` (all accepted)"]
        if self.gemini:
            notes += [f"Gemini batch returned {3072} values for a smaller output_dimensionality in user pipelines "
                      "(2026-11): the 'vector length' line above says what this job did",
                      "UNCONFIRMED: the fallback shape response.embeddings[0].values"]
        else:
            notes += ["UNCONFIRMED: outputDimensionality as a batch model parameter of the classic models "
                      f"(sent when dimensions != {CLASSIC.default_dimensions}), and whether such vectors come "
                      "unit length (the 'unit length' line above)",
                      "classic task_type per line is used by real users but not shown on Google's batch page"]
        return notes

    def close(self) -> None:
        """Release the HTTP sessions (the clients are built again on next use)."""
        for client in (self._jobs_client, self._predict_client):
            if client is not None:
                client.transport.close()
        self.gcs.close()
        self._jobs_client = self._predict_client = None

    def check(self) -> list[CheckResult]:
        """Settings, credentials, bucket writable, JobService answering: one CheckResult each."""
        try:
            self._require_settings()
        except SetupError as e:
            return [CheckResult("vertex settings", False, str(e))]
        out = [CheckResult("vertex settings", True, f"project {self.project}, {self.location}, model {self.model}")]
        if self.gemini and self.location not in GEMINI_BATCH_REGIONS:
            out.append(CheckResult(
                "vertex region", True, f"vertex.location = {self.location!r}: Gemini embedding batch jobs ran only "
                f"in {', '.join(GEMINI_BATCH_REGIONS)} (Vertex AI docs, 2026-11); jobs here may be refused",
                warning=True))
        try:
            self._creds()
            out.append(CheckResult("credentials", True, self.settings.credentials))
        except Exception as e:  # noqa: BLE001
            return out + [CheckResult("credentials", False, message(e))]
        out.append(self.gcs.probe(f"{self.root}/.batchd-check"))
        out.append(self._check_jobs())
        return out

    def _check_jobs(self) -> CheckResult:
        name = "vertex job service"
        try:
            pager = self.jobs.list_batch_prediction_jobs(
                request={"parent": self.parent, "page_size": 1}, retry=quick_retry(self.settings),
                timeout=self.timeout)
            next(iter(pager.pages), None)
        except Exception as e:  # noqa: BLE001
            return CheckResult(name, False, f"listing batch prediction jobs in {self.parent} failed: {message(e)}")
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
            raise PermanentError(message(e)) from None
        preds = [json_format.MessageToDict(p) for p in resp._pb.predictions]
        emb = embedding_of({"predictions": preds})
        if emb is None:
            raise BackendError("the online prediction returned no embedding")
        try:
            # Queries get the documents' treatment: cut to size and, for Gemini, renormalised (issue 10).
            return fit_vector(emb.values, self.dimensions, renormalise=self.gemini)[0]
        except VectorError as e:
            raise BackendError(f"the online prediction returned an unusable embedding: {e}") from None


# ---------------------------------------------------------------------- helpers


def _ts(value: Any) -> float:
    try:
        return float(value.timestamp())
    except Exception:  # noqa: BLE001 - unset timestamps sort first
        return 0.0


__all__ = ["SetupError", "VertexBackend", "load_credentials"]
