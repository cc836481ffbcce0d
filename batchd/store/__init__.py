"""The SQLite file: every SQL statement batchd runs, one concern per module.

Nothing else in batchd imports sqlite3 or sqlite_vec or holds SQL text. :meth:`Store.open` is the entry point.

- connection.py  which SQLite library, pragmas, ``transaction()``, the worker lock
- schema.py      migrations (append-only), the instance id, checks of the application's table
- intake.py      enqueue, hashing, copying known vectors, claiming a batch, its items
- results.py     applying results, finishing / cancelling a batch, retry: every later chunk state change
- reads.py       queue counts, batches, failure reasons, search
- ledger.py      the cost ledger: what each batch sent, answered and cost; spend for budgets; metric totals
- problems.py    what a failure of the file means: busy, disk full, damaged, read-only (one line each)
- lifecycle.py   the operator's schema commands: inspect without changing (check), reset-vectors, uninstall
"""

from __future__ import annotations

from batchd.store.connection import (
    Busy,
    Missing,
    SchemaMismatch,
    StoreBase,
    StoreError,
    _sqlite_module,
    iso,
    lock_path,
    parse_iso,
    quote_ident,
)
from batchd.store.intake import ENQUEUE_SLICE, HASH_SLICE, EnqueueCounts, IntakeMixin, TableRefuses
from batchd.store.ledger import FAILURE_REASONS, LedgerMixin, ModelLedger, Sent
from batchd.store.lifecycle import Change, Inspection, LifecycleMixin
from batchd.store.problems import (
    Damaged,
    DatabaseBusy,
    DiskFull,
    ReadOnly,
    describe_problem,
    explain,
    is_sqlite_error,
)
from batchd.store.reads import BatchRow, ReadsMixin
from batchd.store.results import IN_SLICE, ApplyCounts, ResultsMixin
from batchd.store.schema import SCHEMA_VERSION, STEPS, SchemaMixin


class Store(SchemaMixin, IntakeMixin, ResultsMixin, ReadsMixin, LedgerMixin, LifecycleMixin, StoreBase):
    """One SQLite connection to the shared database file, with batchd's schema in place."""


__all__ = [
    "ENQUEUE_SLICE",
    "FAILURE_REASONS",
    "HASH_SLICE",
    "IN_SLICE",
    "SCHEMA_VERSION",
    "STEPS",
    "ApplyCounts",
    "BatchRow",
    "Busy",
    "Change",
    "Damaged",
    "DatabaseBusy",
    "DiskFull",
    "EnqueueCounts",
    "Inspection",
    "Missing",
    "ModelLedger",
    "ReadOnly",
    "SchemaMismatch",
    "Sent",
    "Store",
    "StoreBase",
    "StoreError",
    "TableRefuses",
    "_sqlite_module",
    "describe_problem",
    "explain",
    "is_sqlite_error",
    "iso",
    "lock_path",
    "parse_iso",
    "quote_ident",
]
