"""The gemini-api backend's settings: the ``[gemini_api]`` section, built and validated by itself.

Owned by the backend (batchd.config only lists the section). Where the API key is read from is decided when the
backend first talks to the service (reading a file is not parsing): see ``gemini_api_client.resolve_api_key``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchd.settings import Duration, SettingError, check_backoff

_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?(/\S*)?$")


@dataclass(frozen=True)
class GeminiApiSettings:
    api_key_file: str = ""  # empty: $CREDENTIALS_DIRECTORY/gemini-api-key (LoadCredential=), else $GEMINI_API_KEY
    base_url: str = ""  # empty: Google's endpoint; an http(s):// URL for emulators and tests
    cleanup: bool = True
    request_timeout: Duration = Duration(60)
    retry_backoff: Duration = Duration(1)  # first wait after a 429/5xx; doubles, with jitter
    retry_deadline: Duration = Duration(300)  # give up retrying one call after this long

    def validate(self) -> None:
        """Raises SettingError for a value that can never work."""
        if self.base_url and not _URL.match(self.base_url):
            raise SettingError("base_url", f"{self.base_url!r} is not an http(s):// URL")
        check_backoff(self.retry_backoff, self.retry_deadline, "gemini_api")


__all__ = ["GeminiApiSettings"]
