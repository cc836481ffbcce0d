"""The manager's bookkeeping of money and size, written once: how many chunks the next batch may claim (the row
limit, ``queue.max_batch_characters``, the model's input bytes, and ``[budget]``), what a submitted batch put on
the wire (the cost ledger's "sent"), and pricing a batch when it closes. Texts over the model's per-input limit are
failed here before sending when ``embedding.auto_truncate`` is false, or flagged per batch when it is true.

It talks to the store only (no SQL, no backend); the arithmetic lives in :mod:`batchd.cost` and
:mod:`batchd.pricing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog

from batchd import cost
from batchd.backends import Item
from batchd.config import Config
from batchd.pricing import billable_characters, estimate_tokens, price_for
from batchd.store import Sent, Store

log = structlog.get_logger("batchd.manager")


class Accounting:
    def __init__(self, store: Store, config: Config, clock: Callable[[], float]):
        self.store = store
        self.config = config
        self.clock = clock
        # The budget as the last flush saw it (None: no cap, or no flush yet), for the CLI and Status=.
        self.budget: cost.BudgetState | None = None
        # The daemon sets this: say that a flush was declined once per budget period, not at every tick.
        self.warn_once = False
        self._warned = ""
        self.declined = False  # the last flush left chunks pending because of the budget

    # ------------------------------------------------------------------ before claiming

    def fail_too_long(self) -> int:
        """With auto_truncate = false, pending texts over the model's input limit become FAILED (not sent)."""
        limit = cost.max_input_characters(self.config)
        if not limit or self.config.embedding.auto_truncate:
            return 0
        tokens = cost.family_for(self.config).max_input_tokens
        return int(self.store.fail_too_long(
            limit, f"text longer than {self.config.embedding.model}'s input limit ({tokens} tokens, about {limit} "
                   "characters) and embedding.auto_truncate is false"))

    def next_batch(self, ignore_budget: bool, pending: int) -> tuple[int, float | None]:
        """How many chunks the next batch may claim, and its estimated cost (None when not computed): the row
        limit, unless the character / byte limits or the budget call for fewer (0: the budget allows nothing)."""
        q = self.config.queue
        fam = cost.family_for(self.config)
        budget = None
        self.declined = False
        if self.config.budget.daily_usd > 0 or self.config.budget.monthly_usd > 0:
            self.budget = cost.budget_state(self.store, self.config, self.clock())
            budget = None if ignore_budget else self.budget.remaining
        if budget is None and not q.max_batch_characters and not fam.max_input_bytes:
            return q.max_batch_size, None
        pack = cost.packer(self.config, budget)
        if budget is None or budget > 0:
            for key, text in self.store.claimable_texts(pack.max_rows):
                if not pack.offer(key, text):
                    break
        self.declined = pack.rows == 0 and budget is not None
        if self.declined:
            self._say_declined(pending, pack)
        return pack.rows, pack.cost

    def _say_declined(self, pending: int, pack: cost.Packer) -> None:
        st = self.budget
        assert st is not None
        period = (st.period or f"day {st.day}") if pack.cost is not None else f"unknown price, day {st.day}"
        if self.warn_once:
            if self._warned == period:
                return  # the daemon says it once per period, not at every tick
            self._warned = period
        reason = ("the price of the model is unknown: set [pricing]" if pack.cost is None
                  else "spent" if st.over else "the next batch's estimated cost is more than what is left")
        log.warning("flush.over_budget", pending=pending, reason=reason, spent_today_usd=st.spent_today,
                    spent_month_usd=st.spent_month, daily_usd=st.daily_usd, monthly_usd=st.monthly_usd,
                    remaining_usd=st.remaining, until=st.describe() if st.over else None)

    # ------------------------------------------------------------------ sent, closed

    @staticmethod
    def counting(items: Iterable[Item], into: dict[str, Any]) -> Iterator[Item]:
        """Pass ``items`` through to the backend, counting rows and characters into ``into``."""
        rows = chars = bill = 0
        for it in items:
            rows += 1
            chars += len(it.text)
            bill += billable_characters(it.text)
            yield it
        into.update(rows=rows, characters=chars, billable=bill)

    def sent(self, batch_id: int, counted: dict[str, Any]) -> None:
        """Record one submission of a batch (rows and characters sent, duplicates spared, its estimate)."""
        dup_rows = dup_chars = dup_bill = 0
        for text, extra in self.store.batch_duplicates(batch_id):
            dup_rows += extra
            dup_chars += extra * len(text)
            dup_bill += extra * billable_characters(text)
        sent = Sent(counted.get("rows", 0), counted.get("characters", 0), counted.get("billable", 0),
                    dup_rows, dup_chars, dup_bill)
        est = price_for(self.config).cost(sent.billable, estimate_tokens(sent.characters))
        self.store.record_sent(batch_id, sent, est, self.clock())
        limit = cost.max_input_characters(self.config)
        over = self.store.count_too_long(batch_id, limit) if limit else 0
        if over:
            log.warning("batch.over_input_limit", batch_id=batch_id, chunks=over, max_characters=limit,
                        note="sent with auto_truncate: the service embeds only the start of these texts")

    def adopted(self, batch_id: int) -> None:
        """A job found after a crash was sent by the process that crashed: count what its batch holds."""
        counted: dict[str, Any] = {}
        for _ in self.counting(self.store.batch_items(batch_id), counted):
            pass
        self.sent(batch_id, counted)

    def closed(self, batch_id: int) -> None:
        """Price what a closing batch was answered, at the price in force now."""
        b = self.store.batch(batch_id)
        self.store.record_cost(batch_id, price_for(self.config, (b.model if b else None) or self.config.embedding.model))


__all__ = ["Accounting"]
