"""Intake: chunks into the queue and into batches — enqueue, hashing new rows, copying vectors a text already
has, claiming a batch (committed before any remote call) and reading back its items.

Chunk state changes made here: a new or re-texted row becomes *pending* (the app's own INSERTs are pending by
the column default); ``copy_known_vectors`` makes a pending chunk *ready* with an existing vector (through
``ResultsMixin._write_vectors``); ``claim_batch`` makes pending chunks *running*. Every other state change is in
results.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from batchd.backends import Item
from batchd.pricing import billable_characters
from batchd.store.connection import StoreBase, StoreError, about_one_row, iso

HASH_SLICE = 5_000
ENQUEUE_SLICE = 10_000  # rows per enqueue transaction: short for the app, yet fewer commits (README, "Benchmarks")


ALL_REFUSED_MIN = 20  # a slice this big refused whole for one reason is the table's schema, not bad lines


class TableRefuses(StoreError):
    """The application's table refused every row of an enqueue slice for one reason: its schema, not the input."""


@dataclass(frozen=True)
class EnqueueCounts:
    inserted: int = 0
    requeued: int = 0
    unchanged: int = 0


class IntakeMixin(StoreBase):
    def enqueue(self, rows: Iterable[tuple[int | None, str]], hasher: Callable[[str], str], now: float,
                on_slice: Callable[[int], None] | None = None,
                on_refused: Callable[[int, str], None] | None = None) -> EnqueueCounts:
        """Insert texts (id None) or upsert by id, in transactions of ENQUEUE_SLICE rows.

        An existing row whose text is unchanged is left alone; one whose text changed is re-queued by the
        update trigger (out of any batch, attempts reset, old vector scheduled for removal).

        A row the application's table refuses (a CHECK or NOT NULL constraint, a trigger's RAISE) fails its whole
        slice; with ``on_refused(index, reason)`` that slice is rolled back and written again row by row in a
        transaction of its own, each refused row reported by its 0-based index in ``rows`` and left out. A slice of
        ALL_REFUSED_MIN rows or more refused whole for one reason raises :class:`TableRefuses` instead.
        """
        inserted = requeued = unchanged = 0
        t, i, x = self.q_table, self.q_id, self.q_text
        q_at = iso(now)
        insert = (f"INSERT INTO {t}({x}, content_hash, queued_at) VALUES (?, ?, ?)")
        upsert = (
            f"INSERT INTO {t}({i}, {x}, content_hash, queued_at) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT({i}) DO UPDATE SET {x} = excluded.{x} WHERE {x} IS NOT excluded.{x}"
        )
        exists = f"SELECT {x} FROM {t} WHERE {i} = ?"
        buf: list[tuple[int | None, str]] = []

        def put(c: Any, batch: list[tuple[int | None, str]], hashes: list[str]) -> tuple[int, int, int]:
            """Write ``batch``; returns its (inserted, requeued, unchanged)."""
            ins = req = same = 0
            run: list[tuple[str, str, str]] = []  # consecutive rows without id: one executemany, in order
            for (cid, text), digest in zip(batch, hashes):
                if cid is None:
                    run.append((text, digest, q_at))
                    continue
                if run:
                    c.executemany(insert, run)
                    ins += len(run)
                    run = []
                old = c.execute(exists, (cid,)).fetchone()
                if old is None:
                    ins += 1
                elif old[0] == text:
                    same += 1
                    continue
                else:
                    req += 1
                c.execute(upsert, (cid, text, digest, q_at))
            if run:
                c.executemany(insert, run)
                ins += len(run)
            return ins, req, same

        def one_by_one(c: Any, batch: list[tuple[int | None, str]], hashes: list[str],
                       first: int) -> tuple[int, int, int]:
            ins = req = same = 0
            refused: list[tuple[int, str]] = []
            for k, (row, digest) in enumerate(zip(batch, hashes)):
                c.execute("SAVEPOINT batchd_row")
                try:
                    i1, r1, s1 = put(c, [row], [digest])
                except self._sqlite.DatabaseError as e:
                    c.execute("ROLLBACK TO batchd_row")
                    c.execute("RELEASE batchd_row")
                    if not about_one_row(e):
                        raise
                    refused.append((first + k, f"{type(e).__name__}: {' '.join(str(e).split())}"))
                    continue
                c.execute("RELEASE batchd_row")
                ins, req, same = ins + i1, req + r1, same + s1
            reasons = {reason for _, reason in refused}
            if len(refused) == len(batch) >= ALL_REFUSED_MIN and len(reasons) == 1:
                # Not a few bad lines: the table takes none of them (a NOT NULL column batchd cannot fill...).
                raise TableRefuses(f"the table {self.config.database.chunks_table} refused every line of a slice "
                                   f"of {len(batch):,} ({reasons.pop()})")
            assert on_refused is not None
            for index, reason in refused:
                on_refused(index, reason)
            return ins, req, same

        def write(batch: list[tuple[int | None, str]], first: int) -> None:
            nonlocal inserted, requeued, unchanged
            hashes = [hasher(text) for _, text in batch]  # before BEGIN: the write lock is held for SQL only
            try:
                with self.transaction() as c:
                    got = put(c, batch, hashes)
            except self._sqlite.DatabaseError as e:  # rolled back: the slice again, row by row (no savepoint on
                if on_refused is None or not about_one_row(e):  # the fast path: it made enqueue ~5x slower)
                    raise
                with self.transaction() as c:
                    got = one_by_one(c, batch, hashes, first)
            inserted, requeued, unchanged = inserted + got[0], requeued + got[1], unchanged + got[2]
            if on_slice:
                on_slice(len(batch))

        first = 0
        for row in rows:
            buf.append(row)
            if len(buf) >= ENQUEUE_SLICE:
                write(buf, first)
                first += len(buf)
                buf = []
        if buf:
            write(buf, first)
        return EnqueueCounts(inserted, requeued, unchanged)

    def purge_tombstones(self) -> int:
        """Remove vectors of chunks the app deleted, rewrote or replaced (the triggers record them; the app's own
        connection may not have sqlite-vec loaded, so triggers never touch chunks_vec themselves).

        A tombstoned chunk that is READY keeps its vector: READY is only ever set together with the vector of the
        current text (and that clears the tombstone), so such a tombstone comes from a write that changed nothing
        (an INSERT OR IGNORE, a no-op UPSERT of an existing id). Returns the tombstones handled.
        """
        t, i = self.q_table, self.q_id
        total = 0
        while True:
            with self.transaction() as c:
                rows = c.execute(
                    f"SELECT b.chunk_id, c.embedding_status FROM batchd_tombstones b "
                    f"LEFT JOIN {t} c ON c.{i} = b.chunk_id LIMIT 2000").fetchall()
                if not rows:
                    return total
                c.executemany("DELETE FROM chunks_vec WHERE chunk_id = ?", [(x,) for x, st in rows if st != "READY"])
                c.executemany("DELETE FROM batchd_tombstones WHERE chunk_id = ?", [(x,) for x, _ in rows])
                total += len(rows)

    def prepare_pending(self, hasher: Callable[[str], str], now: float) -> tuple[int, int]:
        """Hash new pending chunks (rows the app inserted directly) and fail those with no text.

        Returns (hashed, failed_empty). Each slice is its own short transaction.
        """
        t, i, x = self.q_table, self.q_id, self.q_text
        failed = 0
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE {t} SET embedding_status = 'FAILED', batch_job_id = NULL, "
                "error_message = CASE WHEN typeof(" + x + ") IN ('text', 'null') "
                "THEN 'empty text: nothing to embed' ELSE 'text is not a string (' || typeof(" + x + ") || ')' END "
                f"WHERE content_hash IS NULL AND embedding_status = 'PENDING' "
                f"AND ({x} IS NULL OR typeof({x}) != 'text' OR trim({x}) = '')"
            )
            failed = cur.rowcount
        hashed = 0
        q_at = iso(now)
        select = (f"SELECT {i}, {x} FROM {t} WHERE content_hash IS NULL AND embedding_status = 'PENDING' "
                  f"LIMIT {HASH_SLICE}")
        update = f"UPDATE {t} SET content_hash = ?, queued_at = coalesce(queued_at, ?) WHERE {i} = ?"
        while True:
            with self.transaction() as c:
                rows = c.execute(select).fetchall()
                if not rows:
                    break
                c.executemany(update, [(hasher(text), q_at, cid) for cid, text in rows])
                hashed += len(rows)
            if len(rows) < HASH_SLICE:
                break
        return hashed, failed

    def copy_known_vectors(self, now: float) -> int:
        """Pending chunks whose content hash already has a vector get a copy of it, locally (never pay twice)."""
        t, i = self.q_table, self.q_id
        copied = 0
        find = (
            f"SELECT p.{i}, r.{i}, p.{self.q_text} FROM {t} p JOIN {t} r ON r.content_hash = p.content_hash "
            f"AND r.embedding_status = 'READY' "
            f"WHERE p.embedding_status = 'PENDING' AND p.batch_job_id IS NULL AND p.content_hash IS NOT NULL "
            f"GROUP BY p.{i} LIMIT 2000"
        )
        stamp = iso(now)
        while True:
            with self.transaction() as c:
                pairs = c.execute(find).fetchall()
                if not pairs:
                    break
                vecs, sources = [], []
                chars = billable = 0
                for dst, src, text in pairs:
                    row = c.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (src,)).fetchone()
                    if row is not None:
                        vecs.append((dst, row[0]))
                        sources.append((src, dst))
                        chars += len(text)
                        billable += billable_characters(text)
                if not vecs:
                    break
                self._write_vectors(c, vecs, stamp)
                c.executemany(f"UPDATE {t} SET truncated = (SELECT truncated FROM {t} WHERE {i} = ?) WHERE {i} = ?",
                              sources)  # a copy of a vector made from a truncated input is one too
                self._add_copies(c, now, len(vecs), chars, billable)  # type: ignore[attr-defined]
                copied += len(vecs)
            if len(pairs) < 2000:
                break
        return copied

    def pending_summary(self) -> tuple[int, str | None]:
        """(number of claimable pending chunks, queued_at of the oldest)."""
        t = self.q_table
        n = self._conn.execute(
            f"SELECT count(*) FROM {t} WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL "
            "AND content_hash IS NOT NULL"
        ).fetchone()[0]
        oldest = self._conn.execute(
            f"SELECT min(queued_at) FROM {t} WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL"
        ).fetchone()[0]
        return int(n), oldest

    def count_active_batches(self) -> int:
        return int(self._conn.execute(
            "SELECT count(*) FROM batch_jobs WHERE status IN ('PENDING', 'RUNNING')").fetchone()[0])

    def claim_batch(self, max_size: int, model: str, now: float) -> tuple[int, int] | None:
        """Create a PENDING batch row and claim up to ``max_size`` pending chunks for it, in one transaction.

        Chunks whose text is already in flight in another batch are left for later (they will be copied
        from that batch's vector). Returns (batch_id, chunks) or None when nothing is claimable.
        """
        t, i = self.q_table, self.q_id
        stamp = iso(now)
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO batch_jobs(status, model, total_chunks, created_at, updated_at) "
                "VALUES ('PENDING', ?, 0, ?, ?)", (model, stamp, stamp))
            batch_id = int(cur.lastrowid)
            cur = c.execute(
                f"UPDATE {t} SET batch_job_id = ? WHERE {i} IN ("
                f"SELECT p.{i} FROM {t} p WHERE p.embedding_status = 'PENDING' AND p.batch_job_id IS NULL "
                f"AND p.content_hash IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {t} f "
                # "+": look up by content_hash (hash index), never by scanning every in-flight row of the
                # batch index per pending chunk (quadratic: 100,000 chunks took minutes to claim).
                f"WHERE f.content_hash = p.content_hash AND +f.batch_job_id IS NOT NULL) "
                f"ORDER BY p.{i} LIMIT ?)", (batch_id, max_size))
            n = cur.rowcount
            if n <= 0:
                c.execute("DELETE FROM batch_jobs WHERE id = ?", (batch_id,))
                return None
            c.execute("UPDATE batch_jobs SET total_chunks = ? WHERE id = ?", (n, batch_id))
        self.note_claimed(batch_id)
        return batch_id, n

    def batch_items(self, batch_id: int) -> Iterator[Item]:
        """The distinct texts of a batch's in-flight chunks, one Item per content hash (streamed)."""
        cur = self._conn.execute(
            f"SELECT content_hash, {self.q_text} FROM {self.q_table} WHERE batch_job_id = ? "
            "AND embedding_status = 'PENDING' GROUP BY content_hash", (batch_id,))
        for key, text in cur:
            yield Item(key, text)

    def batch_text_count(self, batch_id: int) -> int:
        """Distinct texts (content hashes) of a batch's in-flight chunks: the result lines to expect."""
        return int(self._conn.execute(
            f"SELECT count(DISTINCT content_hash) FROM {self.q_table} WHERE batch_job_id = ? "
            "AND embedding_status = 'PENDING'", (batch_id,)).fetchone()[0])

    def batch_chunk_count(self, batch_id: int) -> int:
        return int(self._conn.execute(
            f"SELECT count(*) FROM {self.q_table} WHERE batch_job_id = ? AND embedding_status = 'PENDING'",
            (batch_id,)).fetchone()[0])

    def mark_submitted(self, batch_id: int, job_name: str, now: float,
                       input_uri: str | None = None, output_uri: str | None = None) -> bool:
        """Record a batch's remote job and mark it RUNNING — only while the batch is still in flight.

        False when it was closed meanwhile (an operator's cancel): a closed batch is never revived, and the
        caller cancels the job it just created.
        """
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE batch_jobs SET google_job_id = ?, status = 'RUNNING', input_uri = coalesce(?, input_uri), "
                "output_uri = coalesce(?, output_uri), error_message = NULL, updated_at = ? "
                "WHERE id = ? AND status IN ('PENDING', 'RUNNING')",
                (job_name, input_uri, output_uri, iso(now), batch_id))
            return cur.rowcount > 0

    # ------------------------------------------------------------------ sizing (budget, size limits, estimate)

    def _claimable_where(self) -> str:
        t = self.q_table
        return (f"p.embedding_status = 'PENDING' AND p.batch_job_id IS NULL AND p.content_hash IS NOT NULL "
                f"AND NOT EXISTS (SELECT 1 FROM {t} f WHERE f.content_hash = p.content_hash "
                f"AND +f.batch_job_id IS NOT NULL)")

    def claimable_texts(self, limit: int) -> Iterator[tuple[str, str]]:
        """(content_hash, text) of the chunks the next :meth:`claim_batch` would take, in its order (streamed)."""
        cur = self._conn.execute(
            f"SELECT p.content_hash, p.{self.q_text} FROM {self.q_table} p WHERE {self._claimable_where()} "
            f"ORDER BY p.{self.q_id} LIMIT ?", (limit,))
        yield from cur

    def pending_texts(self) -> Iterator[tuple[str | None, object]]:
        """(content_hash or None when not hashed yet, text) of every chunk waiting for a batch (streamed)."""
        cur = self._conn.execute(
            f"SELECT content_hash, {self.q_text} FROM {self.q_table} "
            "WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL")
        yield from cur

    def hashes_with_vectors(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` that some READY chunk holds (their chunks would be copied locally)."""
        return self._hashes_where(keys, "embedding_status = 'READY'")

    def hashes_in_flight(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` that a chunk in a batch holds (their chunks wait for that batch's vector)."""
        return self._hashes_where(keys, "embedding_status = 'PENDING' AND batch_job_id IS NOT NULL")

    def _hashes_where(self, keys: list[str], cond: str) -> set[str]:
        out: set[str] = set()
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            out.update(r[0] for r in self._conn.execute(
                f"SELECT DISTINCT content_hash FROM {self.q_table} WHERE {cond} "
                f"AND content_hash IN ({', '.join('?' * len(part))})", part))
        return out

    def fail_too_long(self, max_characters: int, reason: str) -> int:
        """Pending chunks whose text is longer than ``max_characters`` become FAILED with ``reason``."""
        with self.transaction() as c:
            return int(c.execute(
                f"UPDATE {self.q_table} SET embedding_status = 'FAILED', error_message = ? "
                f"WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL AND length({self.q_text}) > ?",
                (reason[:2000], max_characters)).rowcount)

    def count_too_long(self, batch_id: int, max_characters: int) -> int:
        """Chunks of a batch whose text is longer than ``max_characters`` (sent; the service truncates them)."""
        return int(self._conn.execute(
            f"SELECT count(*) FROM {self.q_table} WHERE batch_job_id = ? AND length({self.q_text}) > ?",
            (batch_id, max_characters)).fetchone()[0])
