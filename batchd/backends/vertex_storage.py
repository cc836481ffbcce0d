"""Cloud Storage for the Vertex backend: staging a batch's input, listing and reading a job's output files,
deleting what a batch staged, and the bucket probe of `batchd check`.

The only module that uses the storage client's private ``_http`` session (for one streaming ranged GET per
output file: see :meth:`VertexStorage.read_blocks`). Knows objects and bytes, not jobs or line formats.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from batchd.backends import CheckResult, PermanentError, Progress, _noop
from batchd.backends.vertex_common import make_retry, message, quick_retry, retryable, split_gs

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends.vertex_settings import VertexSettings

log = structlog.get_logger("batchd.vertex")

UPLOAD_BLOCK = 4 * 1024 * 1024  # resumable upload chunk (a multiple of 256 KiB); progress() once per block
READ_BLOCK = 4 * 1024 * 1024  # bytes per read of an output file split into lines here
RAW_BLOCK = 256 * 1024  # bytes per read of an output file handed to the parse workers (stays in the CPU cache)


class VertexStorage:
    """One bucket's objects, through google-cloud-storage. The client is built on first use."""

    def __init__(self, vx: VertexSettings, credentials: Any):
        """``credentials``: a callable returning google-auth credentials (called only when needed)."""
        self.vx = vx
        self.bucket_name = vx.bucket
        self.timeout = float(vx.request_timeout)
        self._credentials = credentials
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import os

            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            if os.environ.get("STORAGE_EMULATOR_HOST") or self.vx.credentials == "anonymous":
                creds: Any = AnonymousCredentials()
            else:
                creds = self._credentials()
            self._client = storage.Client(project=self.vx.project, credentials=creds)
        return self._client

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket_name}/{name}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    # ------------------------------------------------------------------ write

    def upload_lines(self, name: str, lines: Iterable[bytes], progress: Progress = _noop,
                     batch_id: int | None = None) -> int:
        """Stream ``lines`` into object ``name``; return how many were written (0 when it already existed).

        An object left by an earlier attempt is kept (ifGenerationMatch=0). 401/403/404 raise PermanentError.
        """
        from google.api_core import exceptions as gexc

        blob = self.client.bucket(self.bucket_name).blob(name)
        n = 0
        try:
            with blob.open("wb", chunk_size=UPLOAD_BLOCK, if_generation_match=0, content_type="application/jsonl",
                           timeout=self.timeout, retry=make_retry(self.vx)) as f:
                pending = 0
                for data in lines:
                    f.write(data)
                    n += 1
                    pending += len(data)
                    if pending >= UPLOAD_BLOCK:
                        pending = 0
                        progress()
        except Exception as e:  # sorted by HTTP status below
            # The resumable writer raises the media library's InvalidResponse, not api_core's exceptions.
            status = getattr(e, "code", None) if isinstance(e, gexc.GoogleAPICallError) else \
                getattr(getattr(e, "response", None), "status_code", None)
            if status == 412:  # ifGenerationMatch=0: an earlier attempt already staged this batch
                log.info("batch.input_exists", batch_id=batch_id, uri=self.uri(name))
            elif status in (401, 403, 404):
                raise PermanentError(f"cannot write {self.uri(name)}: {message(e)}") from None
            else:
                raise
        progress()
        return n

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (in this bucket); return how many. Idempotent."""
        from google.api_core import exceptions as gexc

        deleted = 0
        for blob in self.client.list_blobs(self.bucket_name, prefix=prefix, retry=make_retry(self.vx),
                                           timeout=self.timeout):
            try:
                blob.delete(timeout=self.timeout, retry=make_retry(self.vx))
                deleted += 1
            except gexc.NotFound:
                pass
        return deleted

    def probe(self, name: str) -> CheckResult:
        """Write and delete a small object: the bucket exists and these credentials may use it."""
        label = f"bucket gs://{self.bucket_name}"
        retry = quick_retry(self.vx)
        try:
            blob = self.client.bucket(self.bucket_name).blob(name)
            blob.upload_from_string(b"ok\n", timeout=self.timeout, retry=retry)
            blob.delete(timeout=self.timeout, retry=retry)
        except Exception as e:  # noqa: BLE001
            return CheckResult(label, False, f"cannot write and delete {name}: {message(e)}")
        return CheckResult(label, True, f"wrote and deleted gs://{self.bucket_name}/{name}")

    # ------------------------------------------------------------------ read

    def list_output(self, folder: str) -> tuple[list[tuple[str, str]], list[str]]:
        """The ``*.jsonl`` files directly in the gs:// ``folder`` as (bucket, name), sorted by name; and the
        names of what was left out (objects in subfolders, other files).

        Only the folder's own files are results: Vertex exports completed rows continuously, and copies under
        ``incremental_predictions/`` (or any other subfolder) would be the same rows read again (issue 10;
        a user pipeline that ran real jobs skips them).
        """
        bucket, prefix = split_gs(folder)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        files, skipped = [], []
        for b in self.client.list_blobs(bucket, prefix=prefix, retry=make_retry(self.vx), timeout=self.timeout):
            rest = b.name[len(prefix):]
            if "/" not in rest and rest.endswith(".jsonl"):
                files.append((bucket, b.name))
            elif rest:
                skipped.append(b.name)
        return sorted(files), sorted(skipped)

    def subfolders(self, folder: str, starting: str = "") -> list[str]:
        """gs:// URIs of the folders directly inside ``folder`` whose name starts with ``starting``."""
        bucket, prefix = split_gs(folder)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        found = set()
        for b in self.client.list_blobs(bucket, prefix=prefix, retry=make_retry(self.vx), timeout=self.timeout):
            head, sep, _ = b.name[len(prefix):].partition("/")
            if sep and head.startswith(starting):
                found.add(f"gs://{bucket}/{prefix}{head}/")
        return sorted(found)

    def read_lines(self, bucket: str, name: str) -> Iterator[bytes]:
        """The object's lines (without their newlines), streamed."""
        # Split blocks into lines ourselves: BlobReader's own readline() reads one byte per call.
        blob = self.client.bucket(bucket).blob(name)
        rest = b""
        for block in self.read_blocks(blob):
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest

    def read_blocks(self, blob: Any, size: int = READ_BLOCK) -> Iterator[bytes]:
        """The object's bytes in ``size`` pieces from one streaming GET.

        A 429/5xx or a connection dropped mid-way resumes at the byte reached (Range), with backoff, until
        vertex.retry_deadline. (Reading through BlobReader/download_as_bytes goes through the client's 8 KiB
        loop, which cost as much CPU as parsing the lines: sync ran ~1.5x slower; see bench/.)
        """
        import random
        import time

        import urllib3
        from google.api_core import exceptions as gexc

        if not blob.media_link:
            blob.reload(timeout=self.timeout, retry=make_retry(self.vx))
        offset, delay = 0, float(self.vx.retry_backoff)
        deadline = time.monotonic() + float(self.vx.retry_deadline)
        while True:
            try:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                with self.client._http.get(blob.media_link, headers=headers, stream=True,
                                           timeout=self.timeout) as resp:
                    if resp.status_code == 416 and offset:
                        return  # the connection dropped right after the last byte
                    if resp.status_code >= 400:
                        raise gexc.from_http_response(resp)
                    skip = offset if resp.status_code != 206 else 0  # the server ignored the Range
                    while True:
                        block = resp.raw.read(size, decode_content=True)
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
                if not (retryable(e) or isinstance(e, (urllib3.exceptions.HTTPError, OSError))) \
                        or time.monotonic() + delay > deadline:
                    raise
                log.warning("job.output_read_retry", file=blob.name, offset=offset, error=message(e))
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 60.0)


__all__ = ["RAW_BLOCK", "READ_BLOCK", "UPLOAD_BLOCK", "VertexStorage"]
