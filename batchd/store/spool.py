"""The results spool: one finished job's parsed output lines, in a scratch SQLite file beside the database.

Applying results in the order the service wrote them (shuffled) makes every short transaction touch pages all
over the chunks table, so each slice re-writes and re-checkpoints ~40% of it. Applying them in chunk-id order
needs every line first: the job's output is parsed into the spool (keyed by content hash, no lock on the shared
database held), then applied in id order (results.py, ``ResultsMixin.apply_spool``).

The spool is a cache, never a record: it is written without a journal or fsync, deleted when the batch's
results are applied, and any spool left by a crash is wiped at the start of the next sync (the job's output is
simply read again). Its size is capped by the caller: a job bigger than the cap is applied in rounds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchd.backends import ResultLine

SPOOL_SUFFIX = "-batchd-spool-"


class Spool:
    """Parsed result lines of one batch: ``lines(key UNIQUE, vec, error, tokens, truncated, characters)``, the
    vectors in ``vectors(id, vector)``.

    A text answered twice keeps its first vector; a vector always wins over an error for the same text. The
    vectors (~3 KB a line) live in their own table so that planning and the counts read ~50-byte rows, not
    every vector again (~0.1 s per 100 MB spooled).
    """

    def __init__(self, path: Path, sqlite: Any):
        self.path = path
        self.lines = 0
        self._vectors = 0  # the last vector id given
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a leftover of a crash: start over
        old = os.umask(0o007)  # holds vectors of the user's texts: never readable by others
        try:
            self._conn = sqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old)
        c = self._conn
        c.execute("PRAGMA journal_mode = OFF")
        c.execute("PRAGMA synchronous = OFF")
        c.execute("PRAGMA cache_size = -4096")  # appends, plus a key index of ~50 bytes a line
        # vec: the id of its vector in ``vectors`` (NULL: an error line). truncated: the service cut the input to
        # the model's token limit (classic statistics.truncated). characters: billable characters of the text,
        # when the line echoed it.
        c.execute("CREATE TABLE lines (key TEXT NOT NULL UNIQUE, vec INTEGER, error TEXT, tokens INTEGER, "
                  "truncated INTEGER NOT NULL DEFAULT 0, characters INTEGER)")
        c.execute("CREATE TABLE vectors (id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
        # The apply plan: the batch's chunks that have a vector here, in id order (filled by apply_spool).
        c.execute("CREATE TABLE plan (id INTEGER PRIMARY KEY, key TEXT NOT NULL, vec INTEGER NOT NULL, "
                  "truncated INTEGER NOT NULL DEFAULT 0)")

    def add(self, lines: Iterable[ResultLine]) -> int:
        """Store a slice of parsed lines in one transaction. Returns how many were added."""
        rows: list[tuple] = []
        vectors: list[tuple[int, bytes]] = []
        for line in lines:
            if not line.keys:
                continue
            vec = None
            if line.vector is not None:
                self._vectors += 1
                vec = self._vectors
                vectors.append((vec, line.vector))
            error = None if vec is not None else (line.error or "no vector in result")
            truncated = 1 if line.truncated else 0
            rows.extend((key, vec, error, line.token_count, truncated, line.characters) for key in line.keys)
        c = self._conn
        c.execute("BEGIN")
        try:
            c.executemany("INSERT INTO vectors(id, vector) VALUES (?, ?)", vectors)
            c.executemany(
                "INSERT INTO lines(key, vec, error, tokens, truncated, characters) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET vec = excluded.vec, error = NULL, tokens = excluded.tokens, "
                "truncated = excluded.truncated, characters = excluded.characters "
                "WHERE lines.vec IS NULL AND excluded.vec IS NOT NULL", rows)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        self.lines += len(rows)
        return len(rows)

    def clear(self) -> None:
        """Empty the spool for the next round (a job bigger than the size cap)."""
        self._conn.execute("DELETE FROM lines")
        self._conn.execute("DELETE FROM vectors")
        self._conn.execute("DELETE FROM plan")
        self.lines = 0

    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        """Close and delete the file. Idempotent."""
        with contextlib.suppress(Exception):
            self._conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spool_path(database: str, batch_id: int) -> Path:
    return Path(f"{database}{SPOOL_SUFFIX}{batch_id}")


def wipe_spools(database: str) -> int:
    """Delete every spool of this database (left by a crash or a kill). Call under the worker lock."""
    db = Path(database)
    n = 0
    for p in db.parent.glob(db.name + SPOOL_SUFFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


__all__ = ["SPOOL_SUFFIX", "Spool", "spool_path", "wipe_spools"]
