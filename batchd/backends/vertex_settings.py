"""The Vertex AI backend's settings: the ``[vertex]`` section, built and validated by itself.

Owned by the backend (batchd.config only lists the section); ``missing()`` is the one place that says which keys
the backend cannot work without.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchd.settings import Duration, SettingError, check_backoff

GS_URI = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(/[^\s]*)?$")
# A host name: labels of letters, digits and '-', not starting or ending with '-'.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ENDPOINT = re.compile(
    r"^(?:https?://)?"
    r"(?:(?P<dotted>(?:" + _LABEL + r"\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"  # name.example.com
    r"|(?P<ipv4>\d{1,3}(?:\.\d{1,3}){3})"
    r"|(?P<ipv6>\[[0-9A-Fa-f:.]+\])"
    r"|(?P<single>[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?))"  # localhost, or a service name with a port
    r"(?::(?P<port>\d{1,5}))?/?$"
)


@dataclass(frozen=True)
class VertexSettings:
    project: str = ""
    location: str = "us-central1"
    staging_uri: str = ""
    api_endpoint: str = ""
    credentials: str = "default"
    cleanup: bool = True
    request_timeout: Duration = Duration(60)
    retry_backoff: Duration = Duration(1)  # first wait after a 429/5xx; doubles, with jitter
    retry_deadline: Duration = Duration(300)  # give up retrying one call after this long

    @property
    def bucket(self) -> str:
        m = GS_URI.match(self.staging_uri)
        return m.group(1) if m else ""

    @property
    def prefix(self) -> str:
        m = GS_URI.match(self.staging_uri)
        return (m.group(2) or "").strip("/") if m else ""

    def validate(self) -> None:
        """Raises SettingError for a value that can never work (a key left empty is :meth:`missing`)."""
        if self.staging_uri and not GS_URI.match(self.staging_uri):
            raise SettingError("staging_uri", f"{self.staging_uri!r} is not a gs://bucket/prefix URI")
        if self.api_endpoint and not _endpoint_ok(self.api_endpoint):
            raise SettingError("api_endpoint", f"{self.api_endpoint!r} is not a host[:port] or http(s):// URL")
        if not self.location:
            raise SettingError("location", "must not be empty")
        check_backoff(self.retry_backoff, self.retry_deadline, "vertex")
        if not self.credentials:
            raise SettingError("credentials",
                               "must be \"default\", \"anonymous\" or the path of a service-account JSON file")

    def missing(self) -> list[str]:
        """Keys the backend needs that are not set, as human lines (``batchd check``, and before any call)."""
        out = []
        if not self.project:
            out.append("vertex.project is not set (the Google Cloud project that runs the jobs)")
        if not self.staging_uri:
            out.append("vertex.staging_uri is not set (a gs://bucket/prefix for job input and output)")
        return out


def _endpoint_ok(value: str) -> bool:
    """A dotted host name, an IP address, ``localhost``, or a single-label name with a port ("vertex:8080").

    A bare word without dot or port ("0s", "yes") is refused: it is a typo, not a host the operator meant.
    """
    m = _ENDPOINT.match(value)
    if not m:
        return False
    if m.group("port") is not None and not 0 < int(m.group("port")) < 65536:
        return False
    if m.group("ipv4") and any(int(part) > 255 for part in m.group("ipv4").split(".")):
        return False
    single = m.group("single")
    return not single or single.lower() == "localhost" or m.group("port") is not None


__all__ = ["GS_URI", "VertexSettings"]
