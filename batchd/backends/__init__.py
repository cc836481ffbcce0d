"""The Backend protocol the manager talks to, and its value types.

A backend runs *jobs*: it accepts a batch of items, embeds them somewhere
(Vertex AI batch prediction, or this machine), and streams the results back.
It knows nothing about SQLite, chunks, retries or deduplication — those live
in the manager, once. Concrete backends import only this module.

Every method may raise :class:`BackendError`. :class:`PermanentError` means
"retrying the same call will not help" (a 400/403/404, a model that does not
exist); any other exception is treated as transient and retried later.

A built-in backend is constructed from its own settings (the frozen dataclass of its section, e.g.
``[vertex]``) and a :class:`BackendContext` (the few facts from the rest of the config it uses), never from the
whole ``Config``; :func:`make_backend` builds both, and runs whatever validation needs this machine's files
(the local model) before constructing, so a constructor never raises ConfigError.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from batchd.errors import BatchdError

if TYPE_CHECKING:  # pragma: no cover
    from batchd.config import Config


class JobState(enum.Enum):
    """A remote job's state, after aiplatform_v1.JobState (names kept, UNSPECIFIED dropped)."""

    QUEUED = "QUEUED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PARTIALLY_SUCCEEDED = "PARTIALLY_SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    PAUSED = "PAUSED"
    EXPIRED = "EXPIRED"
    UPDATING = "UPDATING"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @classmethod
    def named(cls, value: object, *prefixes: str) -> JobState:
        """A service's job state (its client's enum member, or the name) as one of these: the first of
        ``prefixes`` it starts with removed (``JOB_STATE_RUNNING`` -> RUNNING); UNKNOWN for a name not here."""
        name = getattr(value, "name", None) or str(value or "")
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN

    @property
    def has_results(self) -> bool:
        """True for the final states that count as success (the batch ends COMPLETED).

        Not the only states with output: a job that ended FAILED, CANCELLED or EXPIRED may have exported (and
        billed) rows; its output is read too when :attr:`JobInfo.output` names one."""
        return self in (JobState.SUCCEEDED, JobState.PARTIALLY_SUCCEEDED)


_TERMINAL = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.PARTIALLY_SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.EXPIRED,
    }
)


@dataclass(frozen=True, slots=True)
class Item:
    """One distinct text to embed. ``key`` is its content hash (see :func:`content_hash`)."""

    key: str
    text: str


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What a backend knows about one remote job."""

    name: str
    state: JobState
    error: str | None = None
    succeeded: int | None = None
    failed: int | None = None
    output: str | None = None  # where results live (a gs:// folder, a file path); also for a failed job that exported


@dataclass(frozen=True, slots=True)
class ResultLine:
    """The answer for one or more items.

    ``keys`` are the content hashes the line answers (classic Vertex lines answer
    every row with the same text). Exactly one of ``vector`` / ``error`` is set.
    ``vector`` is a little-endian float32 blob of length ``4 * dimensions`` (made by
    :func:`batchd.vectors.fit_vector`). A line with no ``keys`` is an output line that names no row
    (unparseable, or not tied to any text): it changes no chunk and is counted as unmatched.
    ``token_count`` is what the service billed for the line's input, when it says; ``truncated`` that the
    service cut the input to its token limit; ``answered_dims`` the vector length it answered with and
    ``cut`` whether that was longer than asked (and so cut and renormalised); ``characters`` the billable
    characters (:func:`batchd.pricing.billable_characters`) of the answered text when the line echoes it (else
    the store counts them from the chunks that hold the text).
    """

    keys: tuple[str, ...]
    vector: bytes | None = None
    error: str | None = None
    token_count: int | None = None
    truncated: bool = False
    answered_dims: int | None = None
    cut: bool = False
    characters: int | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of ``batchd check``: what was checked, whether it passed, and why not.

    ``warning``: it passed, but something deserves the operator's attention (printed ``warn``; exit 0)."""

    name: str
    ok: bool
    detail: str = ""
    warning: bool = False


class BackendError(BatchdError):
    """A backend call failed; it may succeed if retried later."""


class PermanentError(BackendError):
    """A backend call failed in a way retrying will not fix (bad request, forbidden, no such model)."""


class SetupError(BackendError):
    """Settings or credentials are missing or unusable (no project, no API key, an unreadable key file).

    Deliberately not a PermanentError: the operator fixes the setup and batches proceed, without their
    chunks having burnt attempts meanwhile (they wait, PENDING, with this message on their batch).
    """


@dataclass(frozen=True, slots=True)
class BackendContext:
    """What a built-in backend knows of the configuration beyond its own section: nothing more than it uses.

    ``model``, ``task_type`` and ``dimensions`` are ``[embedding]``'s (they make the content hashes, so every
    backend must embed exactly this); ``database`` is the database file: the backend's own files live next to it
    (:attr:`state_dir`) and are given its owner (``files.adopt``); ``source`` names the config file in messages.
    """

    instance_id: str
    model: str
    task_type: str
    dimensions: int
    database: str
    source: str = "<config>"

    @property
    def state_dir(self) -> Path:
        """Folder for a backend's own files (local jobs, temporary downloads): the database's folder."""
        return Path(self.database).resolve().parent

    @classmethod
    def of(cls, config: Config, instance_id: str) -> BackendContext:
        emb = config.embedding
        return cls(instance_id=instance_id, model=emb.model, task_type=emb.task_type, dimensions=emb.dimensions,
                   database=config.database.path, source=config.source)


class Stopped(BaseException):
    """Raised by a progress callback to abandon a long operation at a safe boundary (shutdown).

    A BaseException, like asyncio's CancelledError: the ``except Exception`` blocks that keep one batch's
    trouble from stopping the others cannot swallow a shutdown. Whoever runs a step catches it by name.
    """


Progress = Callable[..., None]
"""Called by backends during long operations (per uploaded block, per embedded slice): ``progress()``, or
``progress(n)`` from :meth:`Backend.results` with the number of result lines produced so far (for a progress
display that runs ahead of the lines the caller has consumed).

It feeds the daemon's watchdog and may raise :class:`Stopped` when shutdown was asked for.
"""


def _noop(produced: int | None = None) -> None:
    return None


@runtime_checkable
class Backend(Protocol):
    """What the manager needs from an embedding service. Five calls, all idempotent or best effort.

    Optional: ``missing_settings``, the settings it cannot work without that are not set, one human line each
    (``batchd check`` prints each as a FAIL and exits 1; every call that needs them raises :class:`SetupError`).

    A new backend is accepted when it passes the contract suite, ``tests/contract/``: the same scenarios (lost
    create, failed lookup, timeout, bad final states, failed lines, shutdown mid-results, a broken result
    stream, an empty batch) run against every backend. Add a rig for it in ``tests/contract/conftest.py``:
    construct it, and route each fault switch to the backend's own fault injection where it has one (its
    service's fake), else leave it to the generic ``Faults`` wrapper.
    """

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = _noop) -> str:
        """Stage ``items`` and start a job for local batch ``batch_id``; return the job name.

        The job must be findable afterwards with :meth:`find_job` (labels), so a crash after the
        remote create but before the name is recorded is recoverable. Submitting the same batch twice
        after a lost response may create a second job only if :meth:`find_job` could not see the
        first; callers always call ``find_job`` before resubmitting.
        """

    def find_job(self, batch_id: int) -> str | None:
        """The name of the job created for ``batch_id`` by this instance, or None."""

    def status(self, job_name: str) -> JobInfo:
        """The job's current state."""

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        """Stream every result line of a finished job, in any order, in bounded memory.

        Called for every final job that has results or names an output (see :attr:`JobState.has_results`).
        A line that cannot be tied to any row is yielded with no keys (counted as unmatched; its rows count
        as missing). Vectors go through :func:`batchd.vectors.fit_vector`. May be called again from the start
        after an interruption.
        """

    def cancel(self, job_name: str) -> None:
        """Ask for the job to be cancelled. Best effort; never raises for a job already final."""


@runtime_checkable
class RawResults(Protocol):
    """Optional: a backend whose output is lines of JSON hands over the raw bytes, and the manager parses them in
    worker processes beside the download (:mod:`batchd.parse_pool`, ``daemon.parse_workers``). Without it, or
    for small batches, :meth:`Backend.results` is used. Both must give the same lines: the contract suite
    runs its scenarios through both paths for a backend that has this."""

    def result_files(self, job_name: str, progress: Progress = _noop) -> Iterator[tuple[str, Iterable[bytes]]]:
        """(name, its bytes in blocks) for every output file :meth:`Backend.results` would read, in order.
        Reading may raise like ``results`` does (PermanentError for output that is gone)."""

    def line_parser(self) -> tuple[str, dict[str, object]]:
        """``("module:Class", kwargs)``: ``Class(**kwargs).parse(raw_line)`` gives the ResultLine ``results``
        gives for that line (None: a line tied to no row), in another process. kwargs must be JSON."""


@runtime_checkable
class Cleanable(Protocol):
    def cleanup(self, batch_id: int, job_name: str) -> None:
        """Remove staged input/output of a batch whose results were applied. Idempotent."""


@runtime_checkable
class Checkable(Protocol):
    def check(self) -> list[CheckResult]:
        """Probe the service (credentials, bucket, API) and say what works."""


@runtime_checkable
class QueryEmbedder(Protocol):
    def embed_query(self, text: str) -> bytes:
        """Embed one search query online; a float32 blob."""


def content_hash(text: str, model: str, task_type: str, dimensions: int) -> str:
    """The key of a text in one embedding space.

    Two chunks with the same key get the same vector, so the key covers everything that changes the
    vector: model, task type and output dimensionality, not only the text. 32 hex chars (128 bits).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model}\x1f{task_type}\x1f{dimensions}\x1f".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def plugin_settings(cls: type, config: Config) -> object:
    """A plugin backend's own settings, from ``[plugin.<settings_section>]``.

    The class declares ``settings_class`` (a frozen dataclass whose fields are str, int, bool or Duration, with
    defaults; an optional ``validate()`` raises :class:`batchd.config.SettingError`) and ``settings_section``
    (default: the class name in lower case). Raises ConfigError naming the file, ``plugin.<name>.<key>`` and why.
    """
    from batchd.config import build_settings

    name = getattr(cls, "settings_section", None) or cls.__name__.lower()
    return build_settings(cls.settings_class, config.plugin.get(name, {}), f"plugin.{name}",  # type: ignore[attr-defined]
                          config.source)


def make_backend(config: Config, instance_id: str) -> Backend:
    """The only place that names concrete backends, and the one that loads them.

    A built-in backend gets its own section's settings and a :class:`BackendContext`. What can only be validated
    against this machine (the local model: installed, found, its dimensions) is checked here, before construction:
    raises ConfigError naming the file, key and reason (exit 78). A plugin is constructed as
    ``Class(config, instance_id)``, or ``Class(config, instance_id, settings)`` when it declares its own settings
    (see :func:`plugin_settings`). Raises PermanentError for a backend that cannot be loaded.
    """
    kind = config.embedding.backend
    context = BackendContext.of(config, instance_id)
    if kind == "vertex":
        from batchd.backends.vertex import VertexBackend

        return VertexBackend(config.vertex, context)
    if kind == "gemini-api":
        from batchd.backends.gemini_api import GeminiApiBackend

        return GeminiApiBackend(config.gemini_api, context)
    if kind == "local":
        from batchd.backends.local import LocalBackend
        from batchd.backends.local_model import find_model

        return LocalBackend(config.local, context, find_model(config.local, context))
    if ":" in kind:
        import importlib

        module_name, _, attr = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise PermanentError(f"cannot load backend {kind!r}: {e}") from None
        if getattr(cls, "settings_class", None) is None:
            return cls(config, instance_id)  # type: ignore[no-any-return]
        return cls(config, instance_id, plugin_settings(cls, config))  # type: ignore[no-any-return]
    raise PermanentError(f"unknown backend {kind!r}")


__all__ = [
    "Backend",
    "BackendContext",
    "BackendError",
    "CheckResult",
    "Checkable",
    "Cleanable",
    "Item",
    "JobInfo",
    "JobState",
    "PermanentError",
    "Progress",
    "QueryEmbedder",
    "RawResults",
    "ResultLine",
    "SetupError",
    "Stopped",
    "content_hash",
    "make_backend",
    "plugin_settings",
]
