"""What both sides of the Vertex backend share: credentials and the retry policies (an error's words come from
:func:`batchd.errors.message`, and ``SetupError`` from :mod:`batchd.backends`; both re-exported here).

The JobService side (:mod:`batchd.backends.vertex`) and the Cloud Storage side
(:mod:`batchd.backends.vertex_storage`) retry the same errors the same way: 429 / 5xx / dropped connections
with exponential backoff and jitter, from ``vertex.retry_backoff`` up to ``vertex.retry_deadline``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchd.backends import BackendError, SetupError
from batchd.errors import message

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends.vertex_settings import VertexSettings

_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


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


def make_retry(vx: VertexSettings, *, create: bool = False) -> Any:
    """Exponential backoff with jitter on 429/5xx/connection errors; a create retries only 429s."""
    from google.api_core import retry as r

    predicate = retry_create if create else retryable
    return r.Retry(predicate=predicate, initial=float(vx.retry_backoff),
                   maximum=max(float(vx.retry_backoff), min(60.0, float(vx.retry_deadline) / 4)),
                   multiplier=2.0, timeout=float(vx.retry_deadline))


def quick_retry(vx: VertexSettings) -> Any:
    """For `batchd check`: an operator is waiting, so give up after 10 s at most."""
    from google.api_core import retry as r

    deadline = min(10.0, float(vx.retry_deadline))
    return r.Retry(predicate=retryable, initial=min(float(vx.retry_backoff), deadline / 4),
                   maximum=deadline / 4, timeout=deadline)


def retryable(exc: BaseException) -> bool:
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


def retry_create(exc: BaseException) -> bool:
    """A create is retried only when the server surely did nothing (rate limited)."""
    from google.api_core import exceptions as gexc

    return isinstance(exc, (gexc.TooManyRequests, gexc.ResourceExhausted))


def split_gs(uri: str) -> tuple[str, str]:
    """gs://bucket/some/prefix -> ("bucket", "some/prefix"). Raises BackendError for anything else."""
    if not uri.startswith("gs://"):
        raise BackendError(f"job output {uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


__all__ = ["SetupError", "load_credentials", "make_retry", "message", "quick_retry", "retry_create", "retryable",
           "split_gs"]
