"""The Gemini Developer API's Batch Mode (backend ``gemini-api``): the Backend protocol on an API key, no bucket.

A batch's input is written to a temporary JSONL file next to the database, uploaded through the Files API as
``files/batchd-<instance>-<id>`` (a name of our choosing, so a second attempt finds and reuses it), and a batch
is created on the model with ``batches.create_embeddings`` and the display name ``batchd-<instance>-<id>`` —
which is how :meth:`GeminiApiBackend.find_job` finds a batch whose create answer was lost (the list call takes
no filter: every page is read and only exact display names of this instance match, so other applications'
batches in the project are never touched). Results are one generated JSONL file, streamed to a temporary file
and read line by line (bounded memory), then the input file, the result file and the finished batch are
deleted (``gemini_api.cleanup``).

Everything goes through the official google-genai client (``files.upload/get/download/delete``,
``batches.create_embeddings/get/list/cancel/delete``, ``models.embed_content``). The client's own retries are
off; batchd retries 408/429/5xx and dropped connections itself with backoff and jitter until
``gemini_api.retry_deadline`` — except the create, which is never retried (a 503 after the batch was made would
pay twice): a 429 on create is a quota (enqueued tokens) and defers the batch without counting an attempt; an
ambiguous failure looks the batch up by its display name and adopts it.

The limits this service imposes (48 h file lifetime, 2 GiB per input file, concurrent batches, 429 quotas) are
in :data:`batchd.backends.models.GEMINI_API_SERVICE`, with their sources.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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
from batchd.backends.gemini_api_client import (
    GONE_STATUS,
    PROGRESS_BYTES,
    QuotaExceeded,
    ReadProgress,
    ResultsGone,
    WriteProgress,
    call,
    int_or_none,
    make_client,
    message,
    resolve_api_key,
    sdk_errors,
    state_of,
    status_of,
    transient,
    translate,
)
from batchd.backends.gemini_api_lines import GeminiApiLines
from batchd.backends.models import GEMINI_API_SERVICE
from batchd.faults import crash_point
from batchd.logs import MalformedLines
from batchd.vectors import VectorError, fit_vector

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends.gemini_api_settings import GeminiApiSettings

log = structlog.get_logger("batchd.gemini_api")

PROGRESS_LINES = 1000
LIST_PAGE = 100
_BAD_STATES = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})


class GeminiApiBackend:
    """Embeds batches with the Gemini API's Batch Mode. The client is built on first use."""

    def __init__(self, settings: GeminiApiSettings, context: BackendContext):
        self.settings, self.instance_id = settings, context.instance_id
        self.model, self.task_type, self.dimensions = context.model, context.task_type, context.dimensions
        self.lines = GeminiApiLines(self.task_type, self.dimensions)
        self.work_dir = context.state_dir  # temporary input/result files: next to the database, not a tmpfs
        self.key_source = ""
        self._client: Any = None

    # ------------------------------------------------------------------ names

    def display_name(self, batch_id: int) -> str:
        return f"batchd-{self.instance_id}-{batch_id}"

    def input_file(self, batch_id: int) -> str:
        """``files/<id>``: lowercase letters, digits and dashes, at most 40 characters (Files API)."""
        ident = re.sub(r"[^a-z0-9-]", "-", self.display_name(batch_id).lower()).strip("-")
        if len(ident) > 40:
            ident = "batchd-" + hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()
        return f"files/{ident}"

    @property
    def endpoint(self) -> str:
        return self.settings.base_url or "https://generativelanguage.googleapis.com"

    # ------------------------------------------------------------------ client and calls

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client, self.key_source = make_client(self.settings)
        return self._client

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call(self.settings, what, fn, *args, **kwargs)

    # ------------------------------------------------------------------ submit

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = _noop) -> str:
        """Upload the batch's JSONL (reused if an earlier attempt uploaded it) and create its batch.

        Raises QuotaExceeded on 429 (a deferral), PermanentError on a refused request (400/403/404),
        SetupError without a usable key; after an ambiguous create failure the batch is looked up by its
        display name and adopted, else BackendError.
        """
        file_name = self._ensure_input(batch_id, items, progress)
        crash_point("submit.uploaded")
        from google.genai import _common

        try:
            with warnings.catch_warnings():
                # create_embeddings is marked experimental (google-genai 2.x/3.x); that one warning only.
                warnings.filterwarnings("ignore", category=_common.ExperimentalWarning,
                                        message=r".*create_embeddings")
                job = self.client.batches.create_embeddings(
                    model=self.model, src={"file_name": file_name},
                    config={"display_name": self.display_name(batch_id)})
        except sdk_errors() as e:
            if status_of(e) is not None and status_of(e) < 500 and status_of(e) != 408:
                raise translate(e, f"creating the batch for {file_name}") from None
            if not transient(e):
                raise
            log.warning("job.create_ambiguous", batch_id=batch_id, error=message(e))
            try:
                found = self.find_job(batch_id)
            except BackendError as lookup:
                raise BackendError(f"creating the batch failed ({message(e)}), and so did looking for it "
                                   f"({lookup}): the next cycle looks again") from None
            if found:
                log.info("job.create_adopted", batch_id=batch_id, google_job_id=found)
                return found
            raise BackendError(f"creating the batch failed: {message(e)}") from None
        log.info("job.created", batch_id=batch_id, google_job_id=job.name, model=self.model, input=file_name)
        return str(job.name)

    def _ensure_input(self, batch_id: int, items: Iterable[Item], progress: Progress) -> str:
        name = self.input_file(batch_id)
        if self._file_exists(name):
            log.info("batch.input_exists", batch_id=batch_id, file=name)
            return name
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=".batchd-gemini-") as tmp:
            path = Path(tmp) / "input.jsonl"
            lines, size = self._write_input(path, items, progress)
            with path.open("rb") as raw:
                try:
                    self._call("upload", self.client.files.upload, file=ReadProgress(raw, progress),
                               config={"name": name, "display_name": self.display_name(batch_id),
                                       "mime_type": "application/jsonl"})
                except sdk_errors() as e:
                    # ALREADY_EXISTS: an earlier attempt finished the upload after all. (UNCONFIRMED how the Files
                    # API answers a create under a taken name; 409 is what AIP-133 prescribes.)
                    if status_of(e) == 409:
                        log.info("batch.input_exists", batch_id=batch_id, file=name)
                        return name
                    raise translate(e, f"uploading {name}") from None
        log.info("batch.input_uploaded", batch_id=batch_id, file=name, lines=lines, bytes=size)
        return name

    def _write_input(self, path: Path, items: Iterable[Item], progress: Progress) -> tuple[int, int]:
        limit = GEMINI_API_SERVICE.max_input_file_bytes
        lines = size = pending = 0
        with path.open("wb") as f:
            for item in items:
                data = self.lines.input_line(item)
                f.write(data)
                lines += 1
                size += len(data)
                pending += len(data)
                if size > limit:
                    raise PermanentError(f"the batch's input is over the {limit // 1024**3} GiB the Files API "
                                         f"accepts per file: lower queue.max_batch_size")
                if pending >= PROGRESS_BYTES:
                    pending = 0
                    progress()
        progress()
        return lines, size

    def _file_exists(self, name: str) -> bool:
        try:
            f = self._call("file_get", self.client.files.get, name=name)
        except sdk_errors() as e:
            if status_of(e) in GONE_STATUS:
                return False
            raise translate(e, f"looking up {name}") from None
        state = getattr(getattr(f, "state", None), "name", None)
        if state == "FAILED":  # an unusable upload under our name: make room for a new one
            self._ignore_gone(self.client.files.delete, name=name)
            return False
        return True

    # ------------------------------------------------------------------ find / status / cancel

    def find_job(self, batch_id: int) -> str | None:
        """The batch named ``batchd-<instance>-<id>`` (every page read), or None. With several (a create
        repeated by hand), the oldest one not failed wins."""
        want = self.display_name(batch_id)
        found = [j for j in self._all_batches() if j.display_name == want]
        if not found:
            return None
        found.sort(key=lambda j: (state_of(j.state) in _BAD_STATES, str(j.create_time or "")))
        return str(found[0].name)

    def _all_batches(self) -> Iterator[Any]:
        # Pages may hold fewer items than asked, even none, and still carry a nextPageToken: follow the tokens
        # page by page (the SDK's Pager iterator stops with an IndexError on an empty page).
        try:
            pager = self._call("list", self.client.batches.list, config={"page_size": LIST_PAGE})
        except sdk_errors() as e:
            raise translate(e, "listing batches") from None
        while True:
            yield from pager.page
            if not pager.config.get("page_token"):
                return
            try:
                self._call("list", pager.next_page)
            except IndexError:
                return
            except sdk_errors() as e:
                raise translate(e, "listing batches") from None

    def status(self, job_name: str) -> JobInfo:
        job = self._get(job_name)
        state = state_of(job.state)
        output = getattr(job.dest, "file_name", None) if job.dest else None
        error = succeeded = failed = None
        if state.terminal:
            raw = self._raw_batch(job_name)
            stats = ((raw or {}).get("metadata") or {}).get("batchStats") or {}
            succeeded, failed = int_or_none(stats.get("successfulRequestCount")), int_or_none(stats.get("failedRequestCount"))
            if state in _BAD_STATES:
                err = (raw or {}).get("error") or {}
                error = err.get("message") or (f"code {err['code']}" if err.get("code") else
                                               "the service gave no reason")
        return JobInfo(name=str(job.name), state=state, error=error, succeeded=succeeded, failed=failed,
                       output=output)

    def _get(self, job_name: str) -> Any:
        try:
            return self._call("get", self.client.batches.get, name=job_name)
        except sdk_errors() as e:
            err = translate(e, f"reading {job_name}")
            if status_of(e) in GONE_STATUS and not isinstance(err, SetupError):
                raise PermanentError(f"batch {job_name} not found: {message(e)}") from None
            raise err from None

    def _raw_batch(self, job_name: str) -> dict[str, Any] | None:
        """The batch's Operation as the service sent it: the SDK's BatchJob drops ``error`` and ``batchStats``.

        Read through the SDK's own transport (same key, endpoint, timeout); None if that is not possible.
        """
        api = getattr(self.client, "_api_client", None)
        if api is None or not hasattr(api, "request"):  # pragma: no cover - a future SDK without it
            return None
        try:
            resp = self._call("get", api.request, "get", job_name, {})
            body = json.loads(resp.body or "{}")
        except Exception as e:  # noqa: BLE001 - the reason is a nicety; the state is already known
            log.warning("job.reason_unavailable", google_job_id=job_name, error=message(e))
            return None
        return body if isinstance(body, dict) else None

    def cancel(self, job_name: str) -> None:
        """Best effort: a batch already final or gone is not an error."""
        try:
            self._call("cancel", self.client.batches.cancel, name=job_name)
        except sdk_errors() as e:
            if status_of(e) in (400, 403, 404, 409):
                log.info("job.cancel_ignored", google_job_id=job_name, error=message(e))
                return
            raise translate(e, f"cancelling {job_name}") from None
        log.info("job.cancel_requested", google_job_id=job_name)

    # ------------------------------------------------------------------ results

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        """Every line of the batch's result file, streamed through a temporary file (bounded memory).

        Raises ResultsGone (a PermanentError) when the file has expired or was deleted.
        """
        malformed = MalformedLines(log, job_name)
        for file_name, path in self._result_file(job_name, progress):
            with path.open("rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if lineno % PROGRESS_LINES == 0:
                        progress()
                    if not raw.strip():
                        continue
                    line = self.lines.parse(raw)
                    if line is None:  # yielded without keys: the manager counts it as unmatched
                        malformed(file_name, lineno)
                        line = ResultLine((), error=f"{file_name}:{lineno}: an output line tied to no row")
                    yield line
            progress()

    def result_files(self, job_name: str, progress: Progress = _noop) -> Iterator[tuple[str, Iterator[bytes]]]:
        """The file :meth:`results` reads, downloaded the same way, as raw bytes (RawResults)."""
        for file_name, path in self._result_file(job_name, progress):
            yield file_name, _file_blocks(path, progress)

    def _result_file(self, job_name: str, progress: Progress) -> Iterator[tuple[str, Path]]:
        """(name, local copy) of the batch's result file, while the caller reads it; nothing for a batch without
        one (said in a warning). The copy lives in a temporary folder beside the database."""
        job = self._get(job_name)
        file_name = getattr(job.dest, "file_name", None) if job.dest else None
        if not file_name:
            log.warning("job.no_result_file", google_job_id=job_name, state=state_of(job.state).value)
            return
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=".batchd-gemini-") as tmp:
            path = Path(tmp) / "results.jsonl"
            self._download(file_name, path, progress)
            yield file_name, path

    def line_parser(self) -> tuple[str, dict[str, object]]:
        return "batchd.backends.gemini_api_lines:GeminiApiLines", {
            "task_type": self.task_type, "dimensions": self.dimensions}

    def _download(self, file_name: str, path: Path, progress: Progress) -> None:
        def once() -> None:
            with path.open("wb") as f:
                self.client.files.download(file=file_name, destination=WriteProgress(f, progress))

        try:
            self._call("download", once)
        except sdk_errors() as e:
            if status_of(e) in GONE_STATUS:
                hours = GEMINI_API_SERVICE.file_ttl_seconds // 3600
                raise ResultsGone(f"result file {file_name} is gone (the Gemini API deletes files {hours} hours "
                                  f"after they are made): {message(e)}") from None
            raise translate(e, f"downloading {file_name}") from None

    # ------------------------------------------------------------------ cleanup / check / query

    def cleanup(self, batch_id: int, job_name: str) -> None:
        """Delete the uploaded input, the result file and the (finished) batch. Idempotent."""
        if not self.settings.cleanup:
            return
        result = None
        try:
            job = self._get(job_name)
            result = getattr(job.dest, "file_name", None) if job.dest else None
            final = state_of(job.state).terminal
        except PermanentError:
            final = False  # already gone
        deleted = 0
        for name in (self.input_file(batch_id), result):
            if name and self._ignore_gone(self.client.files.delete, name=name):
                deleted += 1
        if final:  # deleting a batch does not cancel it: only finished batches are deleted
            self._ignore_gone(self.client.batches.delete, name=job_name)
        log.info("batch.cleaned_up", batch_id=batch_id, google_job_id=job_name, files=deleted, batch_deleted=final)

    def discard(self, batch_id: int) -> int:
        """Remove everything batch ``batch_id`` left with the service, whatever ``gemini_api.cleanup`` says (used
        by ``check --live``): an unfinished batch is cancelled first — deleting a batch does not cancel it.
        Returns how many files and batches were deleted."""
        deleted = 0
        for job in [j for j in self._all_batches() if j.display_name == self.display_name(batch_id)]:
            if not state_of(job.state).terminal:
                self.cancel(str(job.name))
            result = getattr(job.dest, "file_name", None) if job.dest else None
            if result and self._ignore_gone(self.client.files.delete, name=result):
                deleted += 1
            deleted += self._ignore_gone(self.client.batches.delete, name=str(job.name))
        deleted += self._ignore_gone(self.client.files.delete, name=self.input_file(batch_id))
        return deleted

    def output_files(self, job_name: str) -> list[str]:
        """The result files of a batch (one at most, ``dest.file_name``), for ``check --live``."""
        job = self._get(job_name)
        name = getattr(job.dest, "file_name", None) if job.dest else None
        return [name] if name else []

    def live_notes(self) -> list[str]:
        """What is not settled by a primary source, for the first real run to look at (``check --live``)."""
        return [
            "where an output line's token count sits: response.tokenCount (an int64, so a string) is read; "
            "'token counts' above shows whether it came",
            "whether a FAILED or EXPIRED batch exports a result file (undocumented): batchd reads one whenever "
            "the batch names it",
            "input lines carry task_type and output_dimensionality flat in the request (Google's Sept 2025 "
            "announcement, and google-genai's own mapping of inlined requests)",
        ]

    def _ignore_gone(self, fn: Callable[..., Any], **kwargs: Any) -> bool:
        try:
            self._call("delete", fn, **kwargs)
        except sdk_errors() as e:
            if status_of(e) in GONE_STATUS:
                return False
            raise translate(e, "deleting") from None
        return True

    def close(self) -> None:
        if self._client is not None:
            closer = getattr(self._client, "close", None)
            if callable(closer):
                closer()
        self._client = None

    def check(self) -> list[CheckResult]:
        """The key is present (never shown), and the API answers a one-item list of batches."""
        try:
            self.client  # noqa: B018 - builds the client, reading the key
        except SetupError as e:
            return [CheckResult("gemini api key", False, str(e))]
        out = [CheckResult("gemini api key", True, f"read from {self.key_source}")]
        name = "gemini api batches"
        try:
            pager = self._call("list", self.client.batches.list, config={"page_size": 1},
                               deadline=min(10.0, float(self.settings.retry_deadline)))
            len(pager.page)
        except Exception as e:  # noqa: BLE001
            out.append(CheckResult(name, False, f"listing batches at {self.endpoint} failed: "
                                                f"{message(translate(e, 'listing batches'))}"))
            return out
        out.append(CheckResult(name, True, f"listed batches at {self.endpoint} (model {self.model})"))
        return out

    def embed_query(self, text: str) -> bytes:
        """Embed one search query online (task RETRIEVAL_QUERY); the same fitting as batch vectors."""
        try:
            resp = self._call("embed", self.client.models.embed_content, model=self.model, contents=text,
                              config={"task_type": "RETRIEVAL_QUERY", "output_dimensionality": self.dimensions})
        except sdk_errors() as e:
            raise translate(e, "embedding the query") from None
        embs = getattr(resp, "embeddings", None) or []
        values = getattr(embs[0], "values", None) if embs else None
        if not values:
            raise BackendError("the online embedding returned no vector")
        try:
            return fit_vector(values, self.dimensions, renormalise=self.lines.renormalise)[0]
        except VectorError as e:
            raise BackendError(f"the online embedding is unusable: {e}") from None


def _file_blocks(path: Path, progress: Progress, size: int = 256 * 1024) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as f:
        while block := f.read(size):
            progress()
            yield block


__all__ = ["GeminiApiBackend", "QuotaExceeded", "ResultsGone", "SetupError", "resolve_api_key"]
