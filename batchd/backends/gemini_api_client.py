"""The google-genai side of the gemini-api backend: the API key, the client, retries with backoff, progress
while the SDK uploads or downloads, and the SDK's errors turned into batchd's (what the manager's failure policy
understands). The key is passed to the client explicitly and appears in no message this module makes.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from batchd.backends import BackendError, JobState, PermanentError, Progress, SetupError
from batchd.errors import message  # the one place that turns an exception into a line

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends.gemini_api_settings import GeminiApiSettings

log = structlog.get_logger("batchd.gemini_api")

KEY_CREDENTIAL = "gemini-api-key"  # the name systemd's LoadCredential= gives the key file
KEY_ENV = "GEMINI_API_KEY"
PROGRESS_BYTES = 4 * 1024 * 1024  # progress() at least once per this many bytes written or read
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
GONE_STATUS = frozenset({403, 404})  # a missing or expired file answers 403 PERMISSION_DENIED, not 404


class QuotaExceeded(BackendError):
    """429 RESOURCE_EXHAUSTED (enqueued-token quota, or too many concurrent batches): a deferral."""


class ResultsGone(PermanentError):
    """The batch's result file no longer exists (files are deleted 48 hours after they are made)."""


def resolve_api_key(api_key_file: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(key, where it came from). ``gemini_api.api_key_file``, else ``$CREDENTIALS_DIRECTORY/gemini-api-key``
    (systemd LoadCredential=), else ``$GEMINI_API_KEY`` — never ``GOOGLE_API_KEY``, which the SDK would prefer.

    Raises SetupError; its message names the place and never contains the key.
    """
    env = dict(os.environ) if env is None else env
    path: Path | None = None
    if api_key_file:
        path = Path(api_key_file)
        where = f"gemini_api.api_key_file ({path})"
    elif env.get("CREDENTIALS_DIRECTORY") and (Path(env["CREDENTIALS_DIRECTORY"]) / KEY_CREDENTIAL).is_file():
        path = Path(env["CREDENTIALS_DIRECTORY"]) / KEY_CREDENTIAL
        where = f"systemd credential {KEY_CREDENTIAL}"
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise SetupError(f"{where} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SetupError(f"{where} cannot be read: {getattr(e, 'strerror', None) or type(e).__name__}") from None
        if not key:
            raise SetupError(f"{where} is empty")
        return key, where
    key = (env.get(KEY_ENV) or "").strip()
    if key:
        return key, f"${KEY_ENV}"
    raise SetupError(f"no Gemini API key: set gemini_api.api_key_file, provide the credential {KEY_CREDENTIAL} "
                     f"with systemd LoadCredential=, or set ${KEY_ENV}")


def make_client(settings: GeminiApiSettings) -> tuple[Any, str]:
    """(a google-genai Client for the Developer API, where its key came from). Raises SetupError.

    The client's own retries are off (:func:`call` retries, and never a create); ``vertexai=False`` so that
    ``GOOGLE_GENAI_USE_VERTEXAI`` in the environment cannot turn it into a Vertex client.
    """
    key, source = resolve_api_key(settings.api_key_file)
    from google import genai
    from google.genai import types

    options = types.HttpOptions(timeout=int(float(settings.request_timeout) * 1000),
                                retry_options=types.HttpRetryOptions(attempts=1))
    if settings.base_url:
        options.base_url = settings.base_url
    return genai.Client(api_key=key, vertexai=False, http_options=options), source


def call(settings: GeminiApiSettings, what: str, fn: Callable[..., Any], *args: Any, deadline: float | None = None,
         **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried on 408/429/5xx and dropped connections with exponential backoff and
    jitter until ``gemini_api.retry_deadline`` (or ``deadline`` seconds); other errors are raised at once."""
    give_up = time.monotonic() + (float(settings.retry_deadline) if deadline is None else deadline)
    delay = float(settings.retry_backoff)
    while True:
        try:
            return fn(*args, **kwargs)
        except sdk_errors() as e:
            if not transient(e) or time.monotonic() + delay > give_up:
                raise
            log.warning("gemini_api.retry", call=what, error=message(e), wait_ms=round(delay * 1000))
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 60.0)


def sdk_errors() -> tuple[type[BaseException], ...]:
    """What the SDK raises for a failed request: its APIError, and the HTTP library's transport errors."""
    from google.genai import errors

    try:
        import httpx
    except ImportError:  # pragma: no cover
        return (errors.APIError, ConnectionError, TimeoutError)
    return (errors.APIError, httpx.TransportError, ConnectionError, TimeoutError)


class ReadProgress(io.IOBase):
    """A binary file the SDK's uploader reads block by block; every read feeds progress (the watchdog)."""

    mode = "rb"

    def __init__(self, f: Any, progress: Progress):
        self._f, self._progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self._progress()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._f.seek(offset, whence))

    def tell(self) -> int:
        return int(self._f.tell())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class WriteProgress:
    """The download destination: blocks go to a file, and progress is fed every few MiB."""

    def __init__(self, f: Any, progress: Progress):
        self._f, self._progress, self._pending = f, progress, 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._pending += len(data)
        if self._pending >= PROGRESS_BYTES:
            self._pending = 0
            self._progress()
        return len(data)


def status_of(e: BaseException) -> int | None:
    from google.genai import errors

    if isinstance(e, errors.APIError):
        return int(e.code) if isinstance(e.code, int) else None
    return None


def transient(e: BaseException) -> bool:
    code = status_of(e)
    if code is not None:
        return code in RETRY_STATUS
    try:
        import httpx
    except ImportError:  # pragma: no cover
        return isinstance(e, (ConnectionError, TimeoutError))
    return isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError))


def translate(e: BaseException, doing: str) -> BaseException:
    """The SDK's exception as one of batchd's: what the manager's failure policy understands."""
    if isinstance(e, BackendError):
        return e
    code = status_of(e)
    text = f"{doing}: {message(e)}"
    if code == 429:
        return QuotaExceeded(f"{text} (a Gemini API quota: the batch waits and is tried again)")
    if code == 401 or (code in (400, 403) and "api key" in message(e).lower()):
        return SetupError(f"the Gemini API refused the API key ({doing}): {message(e)}")
    if code in (400, 403, 404):
        return PermanentError(text)
    return BackendError(text)


def state_of(value: Any) -> JobState:
    """A batch's state: the SDK names them ``JOB_STATE_*`` (some versions ``BATCH_STATE_*``)."""
    return JobState.named(value, "JOB_STATE_", "BATCH_STATE_")


def int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


__all__ = ["GONE_STATUS", "KEY_CREDENTIAL", "KEY_ENV", "QuotaExceeded", "ReadProgress", "ResultsGone", "SetupError",
           "WriteProgress", "call", "int_or_none", "make_client", "message", "resolve_api_key", "sdk_errors",
           "state_of", "status_of", "transient", "translate"]
