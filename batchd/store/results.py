"""Results: every chunk state change after a batch was claimed, in one file.

Chunk states (columns batchd adds to the application's table):
  pending  embedding_status='PENDING' AND batch_job_id IS NULL
  running  embedding_status='PENDING' AND batch_job_id IS NOT NULL (claimed by a batch)
  ready    embedding_status='READY'   (a vector in chunks_vec)
  failed   embedding_status='FAILED'  (error_message says why)

Transitions made here:
  running -> ready      apply_results (a vector for the chunk's current content hash)
  running -> pending    apply_results / finish_batch: the line failed or was missing (attempts + 1, reason kept)
  running -> failed     the same, once attempts reach max_attempts
  running -> pending    cancel_batch_locally (no attempt counted)
  failed  -> pending    retry_failed (attempts reset)
Outside this file: enqueue, copying known vectors and claiming (intake.py), and the application's triggers
(schema.py: a changed text sends the chunk back to pending and out of its batch, so a stale result finds no chunk
to apply to).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from batchd.backends import ResultLine
from batchd.pricing import billable_characters
from batchd.store.connection import StoreBase, about_one_row, iso
from batchd.store.spool import Spool, spool_path, wipe_spools

IN_SLICE = 500  # keys per "IN (?, ...)" query: well under SQLite's oldest variable limit (999)
SLICE_SECONDS = 0.07  # target time of one apply_spool transaction, COMMIT included (the app waits at most this)
SLICE_ROWS_START, SLICE_ROWS_MIN, SLICE_ROWS_MAX = 500, 50, 20_000


def _next_slice_rows(rows: int, elapsed: float) -> int:
    """Rows for the next slice so that it takes about SLICE_SECONDS (grows at most 2x, shrinks at once)."""
    if elapsed <= 0:
        return min(rows * 2, SLICE_ROWS_MAX)
    want = int(rows * SLICE_SECONDS / elapsed)
    return max(SLICE_ROWS_MIN, min(want, rows * 2, SLICE_ROWS_MAX))


@dataclass(frozen=True)
class ApplyCounts:
    applied: int = 0  # chunks that became READY
    errored: int = 0  # chunks sent back for retry (or FAILED) because their line failed
    failed: int = 0  # of those, chunks that reached max_attempts
    tokens: int = 0
    unmatched: int = 0  # lines that named no row: no key, or a key no chunk of the table has
    truncated: int = 0  # chunks that became READY from an input the service truncated


class ResultsMixin(StoreBase):
    def note_batch_error(self, batch_id: int, error: str, now: float) -> None:
        """Record a transient problem on a batch (it stays as it is and is retried)."""
        with self.transaction() as c:
            c.execute("UPDATE batch_jobs SET error_message = ?, updated_at = ? WHERE id = ?",
                      (error[:2000], iso(now), batch_id))

    def set_remote_state(self, batch_id: int, state: str, now: float, output_uri: str | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE batch_jobs SET remote_state = ?, output_uri = coalesce(?, output_uri), updated_at = ? "
                "WHERE id = ? AND (remote_state IS NOT ? OR ? IS NOT NULL)",
                (state, output_uri, iso(now), batch_id, state, output_uri))

    def apply_results(self, batch_id: int, lines: Sequence[ResultLine], max_attempts: int, now: float) -> ApplyCounts:
        """Apply one slice of result lines in one transaction. Idempotent.

        Only chunks still claimed by this batch are touched: a chunk whose text changed or that was deleted
        while in flight was released by the triggers, so its (stale) result is dropped here.
        """
        t, i = self.q_table, self.q_id
        stamp = iso(now)
        vec_size = 4 * self.dimensions
        ok_keys: list[tuple[str, bytes]] = []
        err_keys: list[tuple[str, str]] = []
        cut_keys: set[str] = set()
        tokens = unmatched = 0
        for line in lines:
            if not line.keys:
                unmatched += 1
            elif line.vector is not None and len(line.vector) == vec_size:
                ok_keys.extend((k, line.vector) for k in line.keys)
                tokens += line.token_count or 0
                if line.truncated:
                    cut_keys.update(line.keys)
            else:
                reason = line.error or (
                    f"vector has {len(line.vector) // 4} dimensions, expected {self.dimensions}"
                    if line.vector is not None else "no vector in result")
                err_keys.extend((k, reason) for k in line.keys)
        applied = errored = failed = 0
        blobs: dict[str, bytes] = {}
        for key, blob in ok_keys:
            blobs.setdefault(key, blob)  # the first answer for a text wins, as before
        keys = list(blobs)
        with self.transaction() as c:
            # One IN query per IN_SLICE keys, through the content-hash index (the unary + keeps SQLite off the
            # batch index, which would scan the whole batch once per slice), not one SELECT per key.
            vecs: list[tuple[int, bytes]] = []
            trunc: list[int] = []
            matched: set[str] = set()
            for start in range(0, len(keys), IN_SLICE):
                part = keys[start:start + IN_SLICE]
                rows = c.execute(
                    f"SELECT {i}, content_hash FROM {t} WHERE +batch_job_id = ? AND +embedding_status = 'PENDING' "
                    f"AND content_hash IN ({', '.join('?' * len(part))})", (batch_id, *part))
                found = [(cid, key) for cid, key in rows]
                vecs.extend((cid, blobs[key]) for cid, key in found)
                trunc.extend(cid for cid, key in found if key in cut_keys)
                matched.update(key for _, key in found)
            vecs.sort(key=lambda v: v[0])  # id order: neighbouring pages for the UPDATE and vec0 writes
            seen: set[str] = set(keys)
            if vecs:
                done, refused = self._write_isolating_refusals(
                    c, [cid for cid, _ in vecs], functools.partial(self._write_vectors_of, c, dict(vecs), stamp))
                self._fail_refused(c, refused)
                applied = len(done)
                errored += len(refused)
                failed += len(refused)
            if trunc:
                c.executemany(f"UPDATE {t} SET truncated = 1 WHERE {i} = ?", [(cid,) for cid in trunc])
            for key, reason in err_keys:
                if key in seen:
                    continue  # a success for the same text already landed in this slice
                seen.add(key)
                e, f = self._retry_chunks(c, "batch_job_id = ? AND content_hash = ? AND embedding_status = 'PENDING'",
                                          (batch_id, key), reason, max_attempts)
                errored += e
                failed += f
                if e:
                    matched.add(key)
            unmatched += self._unknown_keys(c, seen - matched)
            c.execute(
                "UPDATE batch_jobs SET completed_chunks = completed_chunks + ?, failed_chunks = failed_chunks + ?, "
                "token_count = coalesce(token_count, 0) + ?, updated_at = ? WHERE id = ?",
                (applied, errored, tokens, stamp, batch_id))
        return ApplyCounts(applied, errored, failed, tokens, unmatched, len(trunc))

    def _unknown_keys(self, c: Any, keys: set[str]) -> int:
        """How many of ``keys`` (answered, but claimed by no chunk of the batch) no chunk of the table has at all.

        A key some chunk has is a text answered twice or a row applied already: not a mismatch. (A row whose
        text the application changed while in flight has a new hash: its old answer counts as unmatched.)"""
        if not keys:
            return 0
        known: set[str] = set()
        todo = list(keys)
        for start in range(0, len(todo), IN_SLICE):
            part = todo[start:start + IN_SLICE]
            known.update(r[0] for r in c.execute(
                f"SELECT DISTINCT content_hash FROM {self.q_table} WHERE content_hash IN ({', '.join('?' * len(part))})",
                part))
        return len(keys) - len(known)

    def record_unmatched(self, batch_id: int, lines: int, now: float) -> None:
        """The number of output lines of the batch's job that named no row (set after a full read; idempotent)."""
        with self.transaction() as c:
            c.execute("UPDATE batch_jobs SET unmatched_lines = ?, updated_at = ? WHERE id = ?",
                      (lines, iso(now), batch_id))

    def open_spool(self, batch_id: int) -> Spool:
        """A fresh spool file for ``batch_id``'s parsed results, beside the database (see spool.py)."""
        return Spool(spool_path(self.config.database.path, batch_id), self._sqlite)

    def wipe_spools(self) -> int:
        """Delete spools left by a crash. Call under the worker lock (a live sync may be using one)."""
        if self.config.database.path == ":memory:":
            return 0
        return wipe_spools(self.config.database.path)

    def apply_spool(self, batch_id: int, spool: Spool, max_attempts: int, now: float,
                    on_slice: Callable[[int], None] | None = None) -> ApplyCounts:
        """Apply a spool's lines to the batch's chunks in chunk-id order. Idempotent, resumable.

        One read of the batch's (id, content hash) pairs into the spool's plan, then slices in id order, each
        its own short transaction bounded by time (~SLICE_SECONDS including COMMIT): a guarded UPDATE marks
        READY only chunks still claimed by this batch with the same content hash (a text changed or a row
        deleted after planning is never written) and returns their ids, whose vectors are then written.
        Error lines then go through the per-key retry path. ``on_slice(n)`` runs after every committed slice
        with the chunks it made READY (it may raise Stopped: whole slices stay applied, the next sync applies
        the rest; the returned counts then never arrive, so count through ``on_slice``).
        """
        t, i = self.q_table, self.q_id
        stamp = iso(now)
        applied = errored = failed = 0
        c = self._conn
        c.execute("ATTACH DATABASE ? AS batchd_spool", (str(spool.path),))
        try:
            c.execute("PRAGMA batchd_spool.journal_mode = OFF")
            # The spool was written without fsync; the attached schema's default (FULL) would make the first
            # write here fsync its whole file (~0.4 s per 100 MB) for a cache that is never a record.
            c.execute("PRAGMA batchd_spool.synchronous = OFF")
            c.execute("PRAGMA batchd_spool.cache_size = -8192")  # read once, in plan order: a big cache buys nothing
            c.execute("DELETE FROM batchd_spool.plan")
            # Reads the shared database (a WAL snapshot, no write lock) and writes only the spool.
            c.execute(f"INSERT INTO batchd_spool.plan(id, key, vec, truncated) "
                      f"SELECT c.{i}, c.content_hash, s.vec, s.truncated "
                      f"FROM {t} c JOIN batchd_spool.lines s ON s.key = c.content_hash AND s.vec IS NOT NULL "
                      "WHERE c.batch_job_id = ? AND c.embedding_status = 'PENDING'", (batch_id,))
            rows_per_slice, last = SLICE_ROWS_START, None
            while True:
                todo = c.execute(
                    "SELECT p.id, v.vector FROM batchd_spool.plan p JOIN batchd_spool.vectors v ON v.id = p.vec "
                    "WHERE p.id > ? ORDER BY p.id LIMIT ?",
                    (last if last is not None else -(1 << 63), rows_per_slice)).fetchall()
                if not todo:
                    break
                hi = todo[-1][0]
                started = time.monotonic()
                with self.transaction() as w:
                    ok, refused = self._write_isolating_refusals(
                        w, [cid for cid, _ in todo],
                        functools.partial(self._mark_and_write, w, batch_id, dict(todo), stamp))
                    self._fail_refused(w, refused)
                    if ok or refused:
                        w.execute("UPDATE batch_jobs SET completed_chunks = completed_chunks + ?, "
                                  "failed_chunks = failed_chunks + ?, updated_at = ? WHERE id = ?",
                                  (len(ok), len(refused), stamp, batch_id))
                errored += len(refused)
                failed += len(refused)
                elapsed = time.monotonic() - started
                applied += len(ok)
                last = hi
                rows_per_slice = _next_slice_rows(rows_per_slice, elapsed)
                if on_slice:
                    on_slice(len(ok))
            errors = c.execute("SELECT key, error FROM batchd_spool.lines WHERE vec IS NULL").fetchall()
            tokens, billable = c.execute(
                "SELECT coalesce(sum(tokens), 0), coalesce(sum(characters), 0) FROM batchd_spool.lines "
                "WHERE vec IS NOT NULL").fetchone()
            # Cost ledger: the billable characters of every answered text (counted once per complete apply, like
            # the tokens): from the line's echo of the text, else from a chunk that holds it (a text no chunk
            # holds any more, and that its line did not echo, cannot be counted).
            billable += sum(billable_characters(text) for (text,) in c.execute(
                f"SELECT (SELECT c.{self.q_text} FROM {t} c WHERE c.content_hash = s.key LIMIT 1) "
                "FROM batchd_spool.lines s WHERE s.vec IS NOT NULL AND s.characters IS NULL") if isinstance(text, str))
            for start in range(0, max(len(errors), 1), IN_SLICE):
                with self.transaction() as w:
                    part_errored = 0
                    for key, reason in errors[start:start + IN_SLICE]:
                        e, f = self._retry_chunks(
                            w, "+batch_job_id = ? AND content_hash = ? AND +embedding_status = 'PENDING'",
                            (batch_id, key), reason, max_attempts)
                        part_errored += e
                        failed += f
                    errored += part_errored
                    w.execute(
                        "UPDATE batch_jobs SET failed_chunks = failed_chunks + ?, "
                        "token_count = coalesce(token_count, 0) + ?, billable_characters = billable_characters + ?, "
                        "updated_at = ? WHERE id = ?",
                        (part_errored, tokens if start == 0 else 0, billable if start == 0 else 0, stamp, batch_id))
            # Lines whose text no chunk of the table has (through the hash index; normally none): a mismatch
            # between what was sent and what came back, or a row rewritten or deleted while in flight.
            unmatched = c.execute(
                f"SELECT count(*) FROM batchd_spool.lines s WHERE NOT EXISTS "
                f"(SELECT 1 FROM {t} c WHERE c.content_hash = s.key)").fetchone()[0]
            truncated = c.execute(
                f"SELECT count(*) FROM batchd_spool.plan p JOIN {t} c ON c.{i} = p.id "
                "WHERE p.truncated = 1 AND c.truncated = 1").fetchone()[0]
        finally:
            c.execute("DETACH DATABASE batchd_spool")
        return ApplyCounts(applied, errored, failed, int(tokens), int(unmatched), int(truncated))

    def _mark_ready(self, w: Any, batch_id: int, lo: int, hi: int, stamp: str) -> list[int]:
        """READY for the planned chunks in [lo, hi] that have a vector and are still this batch's, with the
        planned content hash. Returns their ids (the guard: nothing else may receive a vector).

        Found by an id range, NOT INDEXED: given the choice, SQLite walked the batch index — every chunk of the
        batch still in flight, once per slice, quadratic in the job's size (a 1M-row job applied at ~400 rows/s),
        above all once ANALYZE had seen that partial index empty (``sqlite_stat1`` "0 0 0")."""
        t, i = self.q_table, self.q_id
        where = (f"{i} BETWEEN ? AND ? AND {i} IN (SELECT p.id FROM batchd_spool.plan p WHERE p.id BETWEEN ? AND ?) "
                 "AND +batch_job_id = ? AND +embedding_status = 'PENDING' "
                 f"AND content_hash = (SELECT p.key FROM batchd_spool.plan p WHERE p.id = {t}.{i})")
        params = (lo, hi, lo, hi, batch_id)
        mark = (f"UPDATE {t} NOT INDEXED SET embedding_status = 'READY', batch_job_id = NULL, error_message = NULL, "
                f"truncated = (SELECT p.truncated FROM batchd_spool.plan p WHERE p.id = {t}.{i}), "
                f"embedded_at = ? WHERE ")
        if self._sqlite.sqlite_version_info >= (3, 35, 0):
            return [r[0] for r in w.execute(mark + where + f" RETURNING {i}", (stamp, *params)).fetchall()]
        ids = [r[0] for r in w.execute(f"SELECT {i} FROM {t} NOT INDEXED WHERE " + where, params).fetchall()]  # pragma: no cover
        w.executemany(mark + f"{i} = ?", [(stamp, x) for x in ids])  # pragma: no cover
        return ids  # pragma: no cover

    def _write_vector_rows(self, c: Any, vecs: list[tuple[int, bytes]]) -> None:
        """The vec0 side of marking chunks READY: replace their vectors, drop their tombstones."""
        ids = [(cid,) for cid, _ in vecs]
        c.executemany("DELETE FROM chunks_vec WHERE chunk_id = ?", ids)
        c.executemany("INSERT INTO chunks_vec(chunk_id, embedding) VALUES (?, ?)", vecs)
        c.executemany("DELETE FROM batchd_tombstones WHERE chunk_id = ?", ids)

    def _mark_and_write(self, w: Any, batch_id: int, blobs: dict[int, bytes], stamp: str,
                        ids: list[int]) -> list[int]:
        """apply_spool's write for the planned ids in [ids[0], ids[-1]]: returns those made READY."""
        done = self._mark_ready(w, batch_id, ids[0], ids[-1], stamp)
        if done:
            self._write_vector_rows(w, [(cid, blobs[cid]) for cid in done])
        return done

    def _write_vectors_of(self, c: Any, blobs: dict[int, bytes], stamp: str, ids: list[int]) -> list[int]:
        """apply_results' write for ``ids``: returns them."""
        self._write_vectors(c, [(cid, blobs[cid]) for cid in ids], stamp)
        return ids

    def _write_isolating_refusals(self, c: Any, ids: list[int], write: Callable[[list[int]], list[int]]
                                  ) -> tuple[list[int], list[tuple[int, str]]]:
        """``write(ids)`` in a savepoint; if SQLite refuses a row, again one id at a time. Returns (the ids
        written, the ids refused with the reason). An error that is not about one row (locked, disk, schema)
        is raised."""
        try:
            return self._in_savepoint(c, functools.partial(write, ids)), []
        except self._sqlite.DatabaseError as e:
            if not about_one_row(e):
                raise
        done: list[int] = []
        refused: list[tuple[int, str]] = []
        for cid in ids:
            try:
                done.extend(self._in_savepoint(c, functools.partial(write, [cid])))
            except self._sqlite.DatabaseError as e:
                if not about_one_row(e):
                    raise
                refused.append((cid, " ".join(str(e).split())))
        return done, refused

    @staticmethod
    def _in_savepoint(c: Any, fn: Callable[[], list[int]]) -> list[int]:
        c.execute("SAVEPOINT batchd_write")
        try:
            out = fn()
        except BaseException:
            c.execute("ROLLBACK TO batchd_write")
            c.execute("RELEASE batchd_write")
            raise
        c.execute("RELEASE batchd_write")
        return out

    def _fail_refused(self, c: Any, refused: list[tuple[int, str]]) -> None:
        """A write SQLite refuses for one chunk (an application trigger or constraint, a key vec0 cannot take)
        fails the same way every time: FAILED now, with the reason, instead of failing the whole slice at every
        sync for ever."""
        c.executemany(f"UPDATE {self.q_table} SET embedding_status = 'FAILED', attempts = attempts + 1, "
                      f"batch_job_id = NULL, error_message = ? WHERE {self.q_id} = ?",
                      [(f"cannot store its vector: {reason}"[:2000], cid) for cid, reason in refused])

    def _write_vectors(self, c: Any, vecs: list[tuple[int, bytes]], stamp: str) -> None:
        """sqlite-vec 0.1.9 has no INSERT OR REPLACE on vec0: DELETE then INSERT, same transaction."""
        ids = [(cid,) for cid, _ in vecs]
        c.executemany("DELETE FROM chunks_vec WHERE chunk_id = ?", ids)
        c.executemany("INSERT INTO chunks_vec(chunk_id, embedding) VALUES (?, ?)", vecs)
        c.executemany(
            f"UPDATE {self.q_table} SET embedding_status = 'READY', batch_job_id = NULL, error_message = NULL, "
            f"truncated = 0, embedded_at = ? WHERE {self.q_id} = ?", [(stamp, cid) for cid, _ in vecs])
        c.executemany("DELETE FROM batchd_tombstones WHERE chunk_id = ?", ids)

    def _retry_chunks(self, c: Any, where: str, params: tuple, reason: str, max_attempts: int) -> tuple[int, int]:
        """attempts+1, release from the batch; FAILED once attempts reach max_attempts. Returns (n, failed)."""
        t = self.q_table
        failed = c.execute(
            f"SELECT count(*) FROM {t} WHERE {where} AND attempts + 1 >= ?", (*params, max_attempts)).fetchone()[0]
        cur = c.execute(
            f"UPDATE {t} SET attempts = attempts + 1, error_message = ?, batch_job_id = NULL, "
            f"embedding_status = CASE WHEN attempts + 1 >= ? THEN 'FAILED' ELSE 'PENDING' END WHERE {where}",
            (reason[:2000], max_attempts, *params))
        return cur.rowcount, int(failed)

    def finish_batch(self, batch_id: int, max_attempts: int, now: float, *, status: str = "COMPLETED",
                     error: str | None = None, missing_reason: str = "missing from the job's output") -> tuple[int, int]:
        """Close a batch whose results were all applied (or whose job failed).

        Every chunk still claimed by it counts one failed attempt with ``error`` (or ``missing_reason``).
        Returns (requeued_or_failed, of_which_failed). Idempotent, and never overwrites a batch already closed —
        above all one an operator cancelled while this sync was reading its results (it stays FAILED). A COMPLETED
        batch keeps no error from an earlier failed attempt (``batchd jobs`` must not show a "will retry" reason on
        a batch that succeeded).
        """
        stamp = iso(now)
        with self.transaction() as c:
            if not _in_flight(c, batch_id):
                return 0, 0
            n, f = self._retry_chunks(c, "batch_job_id = ? AND embedding_status = 'PENDING'", (batch_id,),
                                      error or missing_reason, max_attempts)
            c.execute(
                "UPDATE batch_jobs SET status = ?, "
                "error_message = CASE WHEN ? = 'COMPLETED' THEN ? ELSE coalesce(?, error_message) END, "
                "failed_chunks = failed_chunks + ?, finished_at = coalesce(finished_at, ?), updated_at = ? "
                "WHERE id = ?", (status, status, error, error, n, stamp, stamp, batch_id))
        return n, f

    def cancel_batch_locally(self, batch_id: int, reason: str, now: float) -> int | None:
        """Release a batch's chunks back to PENDING without counting an attempt, and mark it FAILED.

        Returns the chunks released, or None when the batch is not in flight any more (a sync finished it
        first: the cancel lost the race and changed nothing).
        """
        stamp = iso(now)
        with self.transaction() as c:
            if not _in_flight(c, batch_id):
                return None
            cur = c.execute(
                f"UPDATE {self.q_table} SET batch_job_id = NULL, error_message = ? WHERE batch_job_id = ?",
                (reason, batch_id))
            c.execute(
                "UPDATE batch_jobs SET status = 'FAILED', error_message = ?, finished_at = coalesce(finished_at, ?), "
                "updated_at = ? WHERE id = ?", (reason, stamp, stamp, batch_id))
            return int(cur.rowcount)


    def retry_failed(self, now: float) -> int:
        """FAILED chunks back to PENDING with attempts reset (their text will be re-hashed)."""
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE {self.q_table} SET embedding_status = 'PENDING', attempts = 0, error_message = NULL, "
                "batch_job_id = NULL, content_hash = NULL, queued_at = ? WHERE embedding_status = 'FAILED'",
                (iso(now),))
            return cur.rowcount


def _in_flight(c: Any, batch_id: int) -> bool:
    """Inside a write transaction: is the batch still PENDING or RUNNING (not closed by anyone yet)?"""
    row = c.execute("SELECT status FROM batch_jobs WHERE id = ?", (batch_id,)).fetchone()
    return row is not None and row[0] in ("PENDING", "RUNNING")
