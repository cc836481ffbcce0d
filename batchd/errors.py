"""How batchd turns an exception into words: the one place for the line an operator reads.

Every ``error_message`` column, every ``error=`` log field, every ``batchd: ...`` line the CLI prints and every
failed check goes through :func:`one_line` (or :func:`message`, its text without the type name). Rules:

- one line: whitespace (newlines included) is collapsed, and the text is cut at :data:`MAX_LENGTH` characters;
- an HTTP error keeps its status code in front of the server's own message (``403 Permission denied ...``),
  whether it comes from google-api-core (``.code`` / ``.message``) or from the storage media library
  (``.response.status_code`` and a JSON error body);
- batchd's own errors (:class:`BatchdError`: backend, config, store errors) and ``OSError`` are written for
  operators and are shown as they are; anything else also names its type — a ``KeyError``'s text alone
  (``'x'``) says nothing;
- :func:`is_expected` says whether an exception is an operational failure (batchd's own errors, OS and network
  errors, the Google client libraries' errors) or probably a bug, whose traceback must reach the log.

Pure functions of the exception: no I/O, no imports of the rest of batchd.
"""

from __future__ import annotations

MAX_LENGTH = 500

# Errors raised by the network client libraries backends use are operational (a 503, a reset connection),
# not bugs in batchd: matched by the top-level package of the exception's class, so nothing is imported here.
_CLIENT_PACKAGES = frozenset({"google", "requests", "urllib3", "http", "grpc", "httpx", "httpcore"})


class BatchdError(Exception):
    """Base of the errors batchd raises on purpose. Their text is written for the operator who reads it."""


def message(e: BaseException) -> str:
    """The exception's own text on one line (HTTP status first when it has one), without its type name."""
    resp = getattr(e, "response", None)
    if resp is not None and hasattr(resp, "status_code") and not hasattr(e, "message"):
        # The storage media library's InvalidResponse: take the server's own message from the body.
        try:
            detail = resp.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - any body that is not Google's JSON error: show its start
            detail = (getattr(resp, "text", "") or "")[:200]
        return _cut(f"{resp.status_code} {' '.join(str(detail).split())}".strip())
    text = " ".join(str(getattr(e, "message", None) or e).split())
    code = getattr(e, "code", None)
    if isinstance(code, int) and not isinstance(code, bool) and text and not text.startswith(str(code)):
        text = f"{code} {text}"
    return _cut(text)


def one_line(e: BaseException) -> str:
    """The line to store or print for ``e``: its :func:`message`, after its type name unless it is one of
    batchd's own errors or an OSError. Never empty."""
    text = message(e)
    if isinstance(e, (BatchdError, OSError)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def is_expected(e: BaseException) -> bool:
    """True for operational failures worth one line in the log; False for what is probably a bug (a
    TypeError in a backend, a KeyError in a parser), whose traceback the log must keep."""
    if isinstance(e, (BatchdError, OSError)):
        return True
    return type(e).__module__.split(".", 1)[0] in _CLIENT_PACKAGES


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LENGTH else text[: MAX_LENGTH - 1] + "…"


__all__ = ["MAX_LENGTH", "BatchdError", "is_expected", "message", "one_line"]
