"""Money and size: how big and how dear the next batch may be (budget, `queue.max_batch_characters`, the model's
limits), what the pending queue will cost (`batchd estimate`), and what batchd cost and saved (`batchd cost`).

It reads through the store (no SQL here) and prices with :mod:`batchd.pricing`. Nothing here writes.

Budget periods are UTC days and UTC calendar months. Spend is what closed batches were billed plus the estimate
of batches in flight (see batchd/store/ledger.py), so four batches flushed in a row cannot each spend the whole
day's allowance; once a batch is applied its real cost replaces the estimate, higher or lower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from batchd.backends.models import LOCAL, ModelFamily, family_of
from batchd.config import Config
from batchd.pricing import Price, billable_characters, estimate_tokens, price_for, price_from_record

LINE_OVERHEAD_BYTES = 256  # JSON around each text in a job's input line (key, request, config)


def family_for(config: Config) -> ModelFamily:
    """The model family whose limits apply: the local backend has none; others by model name."""
    return LOCAL if config.embedding.backend == "local" else family_of(config.embedding.model)


def max_input_characters(config: Config) -> int | None:
    """The per-text input limit in characters (the model's token limit at ~4 characters per token), or None."""
    tokens = family_for(config).max_input_tokens
    return tokens * 4 if tokens else None


# ---------------------------------------------------------------------------------------------- budget


def day_start(now: float) -> float:
    d = datetime.fromtimestamp(now, UTC)
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


def month_start(now: float) -> float:
    d = datetime.fromtimestamp(now, UTC)
    return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()


def next_month(now: float) -> float:
    d = datetime.fromtimestamp(now, UTC)
    return datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class BudgetState:
    """Spend of today and this month against the caps (0 = no cap)."""

    spent_today: float
    spent_month: float
    daily_usd: float
    monthly_usd: float
    unknown: bool  # some batch's cost is unknown (no price): its spend is not in the figures
    day: float  # start of today (UTC), epoch seconds
    month: float  # start of this month (UTC)

    @property
    def limited(self) -> bool:
        return self.daily_usd > 0 or self.monthly_usd > 0

    @property
    def remaining(self) -> float | None:
        """USD that may still be spent now; None without a cap."""
        left = []
        if self.daily_usd > 0:
            left.append(self.daily_usd - self.spent_today)
        if self.monthly_usd > 0:
            left.append(self.monthly_usd - self.spent_month)
        return max(0.0, min(left)) if left else None

    @property
    def over(self) -> bool:
        r = self.remaining
        return r is not None and r <= 0

    @property
    def until(self) -> float | None:
        """When the spent cap resets (the later of the two if both are spent); None if none is."""
        ends = []
        if self.daily_usd > 0 and self.spent_today >= self.daily_usd:
            ends.append(self.day + 86400)
        if self.monthly_usd > 0 and self.spent_month >= self.monthly_usd:
            ends.append(next_month(self.day))
        return max(ends) if ends else None

    @property
    def period(self) -> str:
        """The period a decline belongs to (the daemon warns once per period)."""
        until = self.until
        return _utc(until) if until else ""

    def describe(self) -> str:
        """e.g. ``over budget until 2026-12-01 00:00 UTC`` or ``today $0.0123 of $5.00``."""
        if self.over and self.until:
            return f"over budget until {_utc(self.until)}"
        parts = [f"today {usd(self.spent_today)}" + (f" of {usd(self.daily_usd)}" if self.daily_usd > 0 else "")]
        if self.monthly_usd > 0:
            parts.append(f"this month {usd(self.spent_month)} of {usd(self.monthly_usd)}")
        return ", ".join(parts)


def budget_state(store: Any, config: Config, now: float) -> BudgetState:
    day, month = day_start(now), month_start(now)
    today, unknown_d = store.spend_since(day)
    this_month, unknown_m = store.spend_since(month)
    return BudgetState(today, this_month, config.budget.daily_usd, config.budget.monthly_usd,
                       unknown_d or unknown_m, day, month)


def spend_line(store: Any, config: Config, now: float) -> str:
    """One line for `stats`: today's and the last 30 days' spend (and the budget, when capped)."""
    today, u1 = store.spend_since(day_start(now))
    month, u2 = store.spend_since(now - 30 * 86400)
    line = f"spend    today {usd(today)}, last 30 days {usd(month)}"
    if u1 or u2:
        line += " (some batches have no known price)"
    st = budget_state(store, config, now)
    if st.limited:
        line += f"; budget: {st.describe()}"
    return line


def status_text(store: Any, config: Config, now: float) -> str:
    """For Status=: ``spent today $0.0123``, plus ``; over budget until ...`` while flush holds chunks back."""
    st = budget_state(store, config, now)
    text = f"spent today {usd(st.spent_today)}" + (" + batches of unknown price" if st.unknown else "")
    return text + (f"; {st.describe()}" if st.over else "")


def usd(x: float | None) -> str:
    if x is None:
        return "unknown"
    return f"${x:,.4f}" if x < 100 else f"${x:,.2f}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------------- sizing


@dataclass
class Packer:
    """Fills one job: distinct texts up to the row, character, byte and budget limits. Duplicates ride free."""

    max_rows: int
    max_characters: int | None
    max_bytes: int | None
    price: Price
    budget_usd: float | None = None  # None: no cap
    rows: int = 0  # chunks taken (claim_batch counts chunks)
    texts: int = 0
    characters: int = 0
    billable: int = 0
    bytes: int = 0
    cost: float | None = 0.0
    declined_for: str = ""  # "", "size" or "budget": why the last offer was refused

    def __post_init__(self) -> None:
        self._seen: set[str] = set()

    def offer(self, key: str, text: Any) -> bool:
        """Take the chunk if it fits; False (nothing taken) when it would break a limit."""
        if self.rows >= self.max_rows:
            self.declined_for = "size"
            return False
        if key in self._seen or not isinstance(text, str):
            self.rows += 1
            return True
        chars, bill = len(text), billable_characters(text)
        size = len(text.encode("utf-8", "surrogatepass")) + LINE_OVERHEAD_BYTES  # input lines are UTF-8 JSON
        cost = text_cost(self.price, chars, bill)
        first = self.texts == 0  # a single text is always a job of its own, however big (never stuck)
        if not first and self.max_characters and self.characters + chars > self.max_characters:
            self.declined_for = "size"
            return False
        if not first and self.max_bytes and self.bytes + size > self.max_bytes:
            self.declined_for = "size"
            return False
        if self.budget_usd is not None:
            total = None if cost is None or self.cost is None else self.cost + cost
            if total is None or total > self.budget_usd + 1e-12:
                self.declined_for = "budget"
                return False
        self._seen.add(key)
        self.rows += 1
        self.texts += 1
        self.characters += chars
        self.billable += bill
        self.bytes += size
        self.cost = None if cost is None or self.cost is None else self.cost + cost
        return True


def text_cost(price: Price, characters: int, billable: int) -> float | None:
    """Estimated batch cost of one text: billable characters, or tokens at ~4 characters each."""
    return price.cost(billable, estimate_tokens(characters))


def packer(config: Config, budget_usd: float | None = None) -> Packer:
    fam = family_for(config)
    rows = config.queue.max_batch_size if fam.max_rows is None else min(config.queue.max_batch_size, fam.max_rows)
    return Packer(rows, config.queue.max_batch_characters or None, fam.max_input_bytes, price_for(config),
                  budget_usd)


# ---------------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Estimate:
    chunks: int  # all pending (not in flight)
    to_send: int  # distinct texts that need the service
    copied_locally: int  # pending chunks whose text already has a vector
    characters: int
    billable_characters: int
    tokens_estimate: int
    jobs: int
    cost_usd: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "to_send": self.to_send, "copied_locally": self.copied_locally,
                "characters": self.characters, "billable_characters": self.billable_characters,
                "tokens_estimate": self.tokens_estimate, "jobs": self.jobs, "cost_usd": self.cost_usd}


def estimate(store: Any, config: Config, hasher: Callable[[str], str], slice_size: int = 5_000) -> Estimate:
    """What flushing every pending chunk now would send and cost. Read-only: it changes nothing in the database.

    Texts not hashed yet are hashed in memory; texts already READY elsewhere count as copied locally; texts
    already in flight are neither sent nor copied (they wait for that batch). Jobs are packed as flush packs
    them (rows, `queue.max_batch_characters`, the model's input bytes), ignoring the budget.
    """
    chunks = copied = 0
    seen: set[str] = set()
    pack = packer(config)
    jobs = 0
    chars = billable = tokens = 0
    cost: float | None = 0.0
    price = pack.price

    def take(batch: list[tuple[str, str]]) -> None:
        nonlocal copied, jobs, pack, chars, billable, tokens, cost
        keys = list({k for k, _ in batch})
        ready = store.hashes_with_vectors(keys)
        flying = store.hashes_in_flight(keys)
        for key, text in batch:
            if key in ready:
                copied += 1
                continue
            if key in flying:
                continue
            if key not in seen:
                seen.add(key)
                c, b = len(text), billable_characters(text)
                chars, billable, tokens = chars + c, billable + b, tokens + estimate_tokens(c)
                one = text_cost(price, c, b)
                cost = None if one is None or cost is None else cost + one
            if not pack.offer(key, text):
                jobs += 1
                pack = packer(config)
                pack.offer(key, text)
            elif jobs == 0:
                jobs = 1

    buf: list[tuple[str, str]] = []
    for key, text in store.pending_texts():
        chunks += 1
        if not isinstance(text, str) or not text.strip():
            continue  # flush fails these (empty or not text): nothing to send
        buf.append((key or hasher(text), text))
        if len(buf) >= slice_size:
            take(buf)
            buf = []
    if buf:
        take(buf)
    return Estimate(chunks, len(seen), copied, chars, billable, tokens, jobs, cost)


# ---------------------------------------------------------------------------------------------- report


def cost_report(store: Any, config: Config, since: float | None) -> dict[str, Any]:
    """`batchd cost`: totals and per model over the period. Amounts are full-precision floats (None: unknown).

    ``online_cost_usd``: the same answered input at the online price. ``saved_usd``: online minus batch cost,
    plus what the rows spared by deduplication and local copies would have cost online.
    """
    by_model: dict[str, dict[str, Any]] = {}
    for m in store.ledger(since):
        price = _price_of(config, m)
        spared = None
        if price is not None and price.online_usd is not None:
            spared = price.cost(m.billable_deduplicated, estimate_tokens(m.characters_deduplicated), online=True)
        saved = None
        if m.cost_usd is not None and m.online_cost_usd is not None and spared is not None:
            saved = m.online_cost_usd - m.cost_usd + spared
        by_model[m.model] = {"batches": m.batches, "rows": m.rows, "characters": m.characters,
                             "billable_characters": m.billable_characters, "tokens": m.tokens,
                             "cost_usd": m.cost_usd, "online_cost_usd": m.online_cost_usd, "saved_usd": saved,
                             "rows_deduplicated": m.rows_deduplicated}
    totals: dict[str, Any] = {k: 0 for k in ("batches", "rows", "characters", "billable_characters", "tokens",
                                              "rows_deduplicated")}
    for k in ("cost_usd", "online_cost_usd", "saved_usd"):
        totals[k] = _sum(m[k] for m in by_model.values())
    for m in by_model.values():
        for k in ("batches", "rows", "characters", "billable_characters", "tokens", "rows_deduplicated"):
            totals[k] += m[k]
    return {**totals, "by_model": by_model}


def _price_of(config: Config, m: Any) -> Price | None:
    if m.price_unit is not None:
        return price_from_record(m.model, m.price_unit, None, m.price_online_usd)
    p = price_for(config, m.model)
    return p if p.online_usd is not None else None


def _sum(values: Iterable[float | None]) -> float | None:
    total = 0.0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def parse_since(text: str, now: float) -> float:
    """'30d', '12h', '2w' or a date '2026-11-01' (UTC) -> epoch seconds. Raises ValueError."""
    from batchd.config import parse_duration

    t = text.strip()
    if t.endswith("w") and t[:-1].isdigit():
        return now - int(t[:-1]) * 7 * 86400
    try:
        return datetime.strptime(t, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        pass
    try:
        return now - parse_duration(t)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like '30d' or '12h' nor a date like 2026-11-01") from None


__all__ = ["BudgetState", "Estimate", "Packer", "budget_state", "cost_report", "estimate", "family_for",
           "max_input_characters", "packer", "parse_since", "spend_line", "usd"]
