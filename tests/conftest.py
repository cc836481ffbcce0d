"""Shared fixtures: real SQLite files in tmp_path, the real store, the file-backed test backend."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Config, from_dict
from batchd.manager import BatchManager
from batchd.store import Store
from tests.configs import MEMBACKEND, MEMBACKEND_EMBEDDING, merge  # MEMBACKEND, merge: also imported from here

REPO = Path(__file__).resolve().parent.parent


class Clock:
    """Time passed in by hand: tests step max_wait and job_timeout without sleeping."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _restore_umask() -> Any:
    """`batchd`'s CLI sets the process umask to 007 (its files are private to owner and group). Tests run the CLI
    in-process through CliRunner, so without this the pytest process keeps that umask: later tests then create
    folders others cannot enter (the throwaway systemd's overlay: "libc.so.6: Permission denied")."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def make(**sections: dict[str, Any]) -> Config:
        base = {
            "database": {"path": str(tmp_path / "app.db")},
            "queue": {"min_batch_size": 1, "max_batch_size": 1000, "max_attempts": 3},
            "embedding": MEMBACKEND_EMBEDDING,
        }
        return from_dict(merge(base, sections), source=str(tmp_path / "batchd.toml"))

    return make


class World:
    """One configured batchd in this process: the config, its store (a real SQLite file), the backend
    ``make_backend`` builds for the config, and a BatchManager on the injected clock."""

    def __init__(self, config: Config, clock: Clock):
        from batchd.backends import make_backend

        self.config = config
        self.clock = clock
        self.store = Store.open(config)
        self.backend = make_backend(config, self.store.instance_id)
        self.manager = BatchManager(self.store, self.backend, config, clock=clock)

    def app_connect(self) -> Any:
        """The application's own connection: same SQLite library as batchd (see Store.sqlite_module),
        but WITHOUT sqlite-vec loaded, as a typical app has it."""
        return self.store.sqlite_module.connect(self.config.database.path)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)  # the backends with HTTP sessions release them
        if close is not None:
            close()
        self.store.close()


@pytest.fixture
def worlds() -> Iterator[list[World]]:
    """The worlds a test builds (append each one): closed at its end."""
    made: list[World] = []
    yield made
    for w in made:
        w.close()


class ScriptedWorld(World):
    """A world on the file-backed test backend, whose knobs are files in ``dir``."""

    def __init__(self, config: Config, clock: Clock, folder: Path):
        super().__init__(config, clock)
        self.dir = folder

    def knobs(self, **knobs: Any) -> None:
        from tests.fakes.membackend import set_knobs

        set_knobs(self.dir, **knobs)


@pytest.fixture
def world(make_config: Callable[..., Config], clock: Clock, tmp_path: Path,
          worlds: list[World]) -> Callable[..., ScriptedWorld]:
    """Build (config, store, backend, manager) on the test backend; closed at teardown."""

    def build(**sections: dict[str, Any]) -> ScriptedWorld:
        w = ScriptedWorld(make_config(**sections), clock, tmp_path / "testbackend")
        worlds.append(w)
        return w

    return build


@pytest.fixture
def batchd_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the real `batchd` console script in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("BATCHD_CONFIG", None)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    return env


@dataclass
class Ran:
    """What a `batchd` command did: the shape of subprocess.CompletedProcess, so tests read the same."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """Undo what batchd.logs.configure() does to this process (root handlers, levels, structlog, excepthooks):
    a command run in-process must not leave the next test logging into its closed output stream."""
    import logging
    import threading

    import structlog

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    config = structlog.get_config()
    hooks = sys.excepthook, threading.excepthook
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for name, lvl in quiet.items():
            logging.getLogger(name).setLevel(lvl)
        structlog.configure(**config)
        logging.captureWarnings(False)
        sys.excepthook, threading.excepthook = hooks


def cli(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Ran:
    """Run `batchd ARGS` in this process through click's CliRunner: output, stderr and exit status as the console
    script gives them. An exception the CLI does not turn into one line fails the test (never a traceback)."""
    from click.testing import CliRunner

    from batchd.cli import main

    overrides: dict[str, str | None] | None = None
    if env is not None:
        overrides = {k: None for k in os.environ if k not in env}
        overrides.update(env)
    with restored_logging():
        r = CliRunner().invoke(main, list(args), input=input, env=overrides, catch_exceptions=False)
    return Ran(r.exit_code, r.stdout, r.stderr)


def batchd_cmd() -> list[str]:
    """The installed console script next to this interpreter, else `python -m batchd.cli`."""
    exe = Path(sys.executable).parent / "batchd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "batchd.cli"]


def on_a_terminal(argv: list[str], env: dict[str, str], *, stderr_too: bool = False, columns: int | None = None,
                  timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with its output on a new pseudo-terminal (stderr too when ``stderr_too``, else discarded;
    ``columns`` wide when given) and read all it writes there: (exit status, text)."""
    import fcntl
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=slave if stderr_too else subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    try:
        return p.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
