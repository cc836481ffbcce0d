"""The cost ledger: what each batch sent and what the service answered and billed, priced at the figure in force
when the batch was closed; the rows deduplication and local copies spared; the spend a budget is checked against;
and the database-derived totals behind the Prometheus counters (so they survive restarts).

Per batch (columns of ``batch_jobs``, migration m004): ``rows_sent`` / ``characters_sent`` / ``billable_sent``
add up every submission of the batch (a resubmitted batch counts twice: it was sent twice); the
``*_deduplicated`` columns count the batch's chunks whose text was another chunk's in the same batch (sent once);
``billable_characters`` and ``token_count`` grow with every answered line (results.py); ``cost_usd`` and
``online_cost_usd`` are set when the batch closes, from those counts and the price recorded beside them.
Local copies (a pending chunk given the vector its text already has) are counted per UTC day and model in
``batchd_copies``.

Spend, for a budget: a closed batch costs what it was billed (``cost_usd``); a batch in flight counts its
estimate (or what is billed so far, if higher). Spend is dated by the batch's ``created_at`` (UTC).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchd.pricing import Price
from batchd.store.connection import StoreBase, iso

LEDGER_COLUMNS = (
    ("rows_sent", "INTEGER NOT NULL DEFAULT 0"),
    ("characters_sent", "INTEGER NOT NULL DEFAULT 0"),
    ("billable_sent", "INTEGER NOT NULL DEFAULT 0"),
    ("rows_deduplicated", "INTEGER NOT NULL DEFAULT 0"),
    ("characters_deduplicated", "INTEGER NOT NULL DEFAULT 0"),
    ("billable_deduplicated", "INTEGER NOT NULL DEFAULT 0"),
    ("billable_characters", "INTEGER NOT NULL DEFAULT 0"),
    ("estimated_cost_usd", "REAL"),
    ("cost_usd", "REAL"),
    ("online_cost_usd", "REAL"),
    ("price_unit", "TEXT"),
    ("price_batch_usd", "REAL"),
    ("price_online_usd", "REAL"),
)

# A batch's spend: billed when closed, else the larger of its estimate and what is billed so far.
_SPEND = ("CASE WHEN status IN ('COMPLETED', 'FAILED') THEN cost_usd "
          "ELSE max(coalesce(estimated_cost_usd, 0), coalesce(cost_usd, 0)) END")

_CLOSED = "status IN ('COMPLETED', 'FAILED')"
# Batches the ledger knows: claimed with an estimate, sent since migration m004, or closed with a price (a
# rejected submit costs 0). Batches closed before the ledger existed have none of these and are left out rather
# than counted as unknown.
_IN_LEDGER = "(rows_sent > 0 OR price_unit IS NOT NULL OR estimated_cost_usd IS NOT NULL)"

# Reason classes of chunk failures (a fixed set: metric label values are never free text).
FAILURE_REASONS = ("line", "job_failed", "job_timeout", "job_lost", "submit_rejected")


@dataclass(frozen=True)
class Sent:
    """What one submission of a batch put on the wire (distinct texts), and what deduplication spared."""

    rows: int = 0
    characters: int = 0
    billable: int = 0
    duplicate_rows: int = 0
    duplicate_characters: int = 0
    duplicate_billable: int = 0


@dataclass(frozen=True)
class ModelLedger:
    """Sums over batches of one model (``cost_usd``/``online_cost_usd`` None when any batch's price is unknown)."""

    model: str
    batches: int = 0
    rows: int = 0
    characters: int = 0
    billable_characters: int = 0
    tokens: int = 0
    cost_usd: float | None = 0.0
    online_cost_usd: float | None = 0.0
    rows_deduplicated: int = 0
    characters_deduplicated: int = 0
    billable_deduplicated: int = 0
    price_unit: str | None = None
    price_online_usd: float | None = None


class LedgerMixin(StoreBase):
    # ------------------------------------------------------------------ writes

    def batch_duplicates(self, batch_id: int) -> Iterator[tuple[str, int]]:
        """(text, extra chunks) for each text that more than one chunk of the batch holds (sent once)."""
        cur = self._conn.execute(
            f"SELECT min({self.q_text}), count(*) - 1 FROM {self.q_table} WHERE batch_job_id = ? "
            "AND embedding_status = 'PENDING' GROUP BY content_hash HAVING count(*) > 1", (batch_id,))
        for text, extra in cur:
            yield str(text), int(extra)

    def record_sent(self, batch_id: int, sent: Sent, estimated_cost: float | None, now: float) -> None:
        """Add one submission's counts to the batch (resubmissions add up); set its duplicates, and its estimate
        unless flush set one when it claimed the batch."""
        with self.transaction() as c:
            c.execute(
                "UPDATE batch_jobs SET rows_sent = rows_sent + ?, characters_sent = characters_sent + ?, "
                "billable_sent = billable_sent + ?, rows_deduplicated = ?, characters_deduplicated = ?, "
                "billable_deduplicated = ?, estimated_cost_usd = coalesce(estimated_cost_usd, ?), "
                "updated_at = ? WHERE id = ?",
                (sent.rows, sent.characters, sent.billable, sent.duplicate_rows, sent.duplicate_characters,
                 sent.duplicate_billable, estimated_cost, iso(now), batch_id))

    def set_estimate(self, batch_id: int, estimated_cost: float | None) -> None:
        """The estimated cost of a batch just claimed: it counts against the budget before it is even submitted."""
        with self.transaction() as c:
            c.execute("UPDATE batch_jobs SET estimated_cost_usd = ? WHERE id = ?", (estimated_cost, batch_id))

    def record_cost(self, batch_id: int, price: Price) -> None:
        """Price a closing batch's answered lines at ``price`` (the figure in force now). Idempotent."""
        with self.transaction() as c:
            row = c.execute("SELECT billable_characters, coalesce(token_count, 0), completed_chunks "
                            "FROM batch_jobs WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return
            billable, tokens, answered = row
            cost, online = price.cost(billable, tokens), price.cost(billable, tokens, online=True)
            if price.unit == "1m_tokens" and answered and not tokens:
                cost = online = None  # answered lines but no token counts: the bill is not known
            c.execute("UPDATE batch_jobs SET cost_usd = ?, online_cost_usd = ?, price_unit = ?, price_batch_usd = ?, "
                      "price_online_usd = ? WHERE id = ?",
                      (cost, online, price.unit, price.batch_usd, price.online_usd, batch_id))

    def _add_copies(self, c: Any, now: float, rows: int, characters: int, billable: int) -> None:
        """Count local copies (inside the caller's transaction)."""
        c.execute(
            "INSERT INTO batchd_copies(day, model, rows, characters, billable_characters) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(day, model) DO UPDATE SET rows = rows + excluded.rows, "
            "characters = characters + excluded.characters, "
            "billable_characters = billable_characters + excluded.billable_characters",
            (iso(now)[:10], self.config.embedding.model, rows, characters, billable))

    # ------------------------------------------------------------------ reads

    def spend_since(self, since: float) -> tuple[float, bool]:
        """(USD spent by batches created at or after ``since``, True if some batch's cost is unknown)."""
        total, unknown = self._conn.execute(
            f"SELECT coalesce(sum({_SPEND}), 0), count(*) - count({_SPEND}) FROM batch_jobs WHERE created_at >= ? "
            f"AND {_IN_LEDGER}", (iso(since),)).fetchone()
        return float(total), bool(unknown)

    def ledger(self, since: float | None = None) -> list[ModelLedger]:
        """Per model: the batches created since ``since`` (all when None) and the local copies of those days."""
        start = iso(since) if since is not None else ""
        out: dict[str, dict[str, Any]] = {}
        for r in self._conn.execute(
                f"SELECT coalesce(model, ''), count(*), sum(rows_sent), sum(characters_sent), sum(billable_characters), "
                f"sum(coalesce(token_count, 0)), sum(cost_usd), sum({_CLOSED} AND cost_usd IS NULL), sum(online_cost_usd), "
                f"sum({_CLOSED} AND online_cost_usd IS NULL), sum(rows_deduplicated), sum(characters_deduplicated), "
                f"sum(billable_deduplicated) FROM batch_jobs WHERE created_at >= ? AND {_IN_LEDGER} GROUP BY 1",
                (start,)):
            out[r[0]] = {"batches": r[1], "rows": r[2] or 0, "characters": r[3] or 0, "billable_characters": r[4] or 0,
                         "tokens": r[5] or 0, "cost_usd": None if r[7] else float(r[6] or 0.0),
                         "online_cost_usd": None if r[9] else float(r[8] or 0.0), "rows_deduplicated": r[10] or 0,
                         "characters_deduplicated": r[11] or 0, "billable_deduplicated": r[12] or 0}
        for model, rows, chars, billable in self._conn.execute(
                "SELECT model, sum(rows), sum(characters), sum(billable_characters) FROM batchd_copies "
                "WHERE day >= ? GROUP BY model", (start[:10],)):
            d = out.setdefault(model, {"cost_usd": 0.0, "online_cost_usd": 0.0})
            d["rows_deduplicated"] = d.get("rows_deduplicated", 0) + rows
            d["characters_deduplicated"] = d.get("characters_deduplicated", 0) + chars
            d["billable_deduplicated"] = d.get("billable_deduplicated", 0) + billable
        for model, d in out.items():
            last = self._conn.execute(
                "SELECT price_unit, price_online_usd FROM batch_jobs WHERE model IS ? AND price_unit IS NOT NULL "
                "ORDER BY id DESC LIMIT 1", (model or None,)).fetchone()
            if last:
                d["price_unit"], d["price_online_usd"] = last
        return [ModelLedger(model, **d) for model, d in sorted(out.items())]

    def vectors_applied_total(self) -> int:
        """Vectors written from results plus local copies, ever (database-derived: survives restarts)."""
        a = self._conn.execute("SELECT coalesce(sum(completed_chunks), 0) FROM batch_jobs").fetchone()[0]
        b = self._conn.execute("SELECT coalesce(sum(rows), 0) FROM batchd_copies").fetchone()[0]
        return int(a) + int(b)

    def chunk_failures_by_reason(self) -> dict[str, int]:
        """Failed chunk attempts ever, by reason class (from each batch's failed_chunks and how it ended)."""
        out = dict.fromkeys(FAILURE_REASONS, 0)
        for reason, n in self._conn.execute(
                "SELECT CASE WHEN status != 'FAILED' OR error_message IS NULL THEN 'line' "
                "WHEN error_message LIKE 'job timed out%' THEN 'job_timeout' "
                "WHEN error_message LIKE 'remote job lost%' THEN 'job_lost' "
                "WHEN error_message LIKE 'submit rejected%' THEN 'submit_rejected' "
                "ELSE 'job_failed' END, coalesce(sum(failed_chunks), 0) FROM batch_jobs GROUP BY 1"):
            out[reason] = out.get(reason, 0) + int(n)
        return out

    def oldest_pending_at(self) -> str | None:
        """queued_at of the oldest chunk waiting for a batch (not in flight)."""
        row = self._conn.execute(
            f"SELECT min(queued_at) FROM {self.q_table} WHERE embedding_status = 'PENDING' AND batch_job_id IS NULL"
        ).fetchone()
        return row[0] if row else None
