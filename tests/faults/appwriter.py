"""An application writing to its own chunks table the ways real applications do — run as a SEPARATE process.

It uses only the standard library's sqlite3 and never loads sqlite-vec, like a typical application sharing the
database with batchd. Any trigger batchd installs must let every one of these writes succeed (issue 9, item 1).

    python tests/faults/appwriter.py DB [PATTERN ...] [--sleep SECONDS]
    python tests/faults/appwriter.py DB --edit-loop SEED STOPFILE

Runs the named patterns (default: all, in order), each on its own range of ids, and prints one JSON line per
pattern: {"pattern": name, "ok": true} or {"pattern": name, "ok": false, "error": "..."}. Exit status 0 when
every pattern succeeded, 1 otherwise. ``--sleep`` makes ``long_transaction`` hold the write lock that long.
``--edit-loop`` edits random rows until STOPFILE exists (the kill loop's busy application).

The table is the one :func:`create_app_table` makes: ``chunks(id INTEGER PRIMARY KEY, content TEXT NOT NULL,
doc_id TEXT, position INTEGER)`` with ROWS rows, ids 1..ROWS, ``doc_id = 'doc-<id // 100>'``.
Each pattern documents which ids it touches and what the expected end state is; :data:`UNCHANGED` lists the ids
whose embedding must NOT be redone and :data:`DELETED` those that must end without a row or vector.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Callable

ROWS = 2_200

PATTERNS: dict[str, Callable[[sqlite3.Connection, float], None]] = {}
UNCHANGED = list(range(81, 101)) + list(range(101, 106))  # same-text updates, other columns, INSERT OR IGNORE
DELETED = list(range(76, 81)) + list(range(900, 1000))


def create_app_table(path: str) -> None:
    """The application's own table, created before batchd ever sees the file."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, content TEXT NOT NULL, doc_id TEXT, position INTEGER)")
    conn.executemany("INSERT INTO chunks(id, content, doc_id, position) VALUES (?, ?, ?, ?)",
                     [(i, f"original paragraph {i}", f"doc-{i // 100}", i % 100) for i in range(1, ROWS + 1)])
    conn.commit()
    conn.close()


def pattern(fn: Callable[[sqlite3.Connection, float], None]) -> Callable[[sqlite3.Connection, float], None]:
    PATTERNS[fn.__name__] = fn
    return fn


@pattern
def upsert(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 1-10: UPSERT a new text, twice in a row (the second runs while the first's cleanup is still pending);
    ids 5001-5005: UPSERT of ids that do not exist yet (inserted)."""
    sql = "INSERT INTO chunks(id, content) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET content = excluded.content"
    for rev in (2, 3):
        conn.executemany(sql, [(i, f"upserted paragraph {i} rev {rev}") for i in range(1, 11)])
        conn.commit()
    conn.executemany(sql, [(i, f"new upserted paragraph {i}") for i in range(5001, 5006)])
    conn.commit()


@pattern
def upsert_guarded(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 106-110: UPSERT with a WHERE on the update (only when the text differs), twice."""
    sql = ("INSERT INTO chunks(id, content) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET content = excluded.content "
           "WHERE content IS NOT excluded.content")
    for rev in (2, 3):
        conn.executemany(sql, [(i, f"guarded paragraph {i} rev {rev}") for i in range(106, 111)])
        conn.commit()


@pattern
def upsert_same_id_three_times(conn: sqlite3.Connection, sleep: float) -> None:
    """id 111: one executemany that upserts the same id with three texts (what `batchd enqueue` of one id
    re-texted three times does); id 112: the same, three separate statements in one transaction."""
    sql = "INSERT INTO chunks(id, content) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET content = excluded.content"
    conn.executemany(sql, [(111, "one"), (111, "two"), (111, "three (final for 111)")])
    for text in ("uno", "dos", "tres (final for 112)"):
        conn.execute(sql, (112, text))
    conn.commit()


@pattern
def insert_or_replace(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 11-20: INSERT OR REPLACE with a new text, twice."""
    for rev in (2, 3):
        conn.executemany("INSERT OR REPLACE INTO chunks(id, content, doc_id) VALUES (?, ?, 'replaced')",
                         [(i, f"replaced paragraph {i} rev {rev}") for i in range(11, 21)])
        conn.commit()


@pattern
def replace_with_nothing_to_embed(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 36-40: INSERT OR REPLACE with an empty text: the chunk ends FAILED, and its old vector must go (REPLACE
    deletes the old row without firing delete triggers)."""
    conn.executemany("INSERT OR REPLACE INTO chunks(id, content) VALUES (?, '')", [(i,) for i in range(36, 41)])
    conn.commit()


@pattern
def replace_into(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 21-30: REPLACE INTO with a new text, twice; ids 31-35: REPLACE INTO with the same text."""
    for rev in (2, 3):
        conn.executemany("REPLACE INTO chunks(id, content) VALUES (?, ?)",
                         [(i, f"replace-into paragraph {i} rev {rev}") for i in range(21, 31)])
        conn.commit()
    conn.executemany("REPLACE INTO chunks(id, content) VALUES (?, ?)",
                     [(i, f"original paragraph {i}") for i in range(31, 36)])
    conn.commit()


@pattern
def text_changed_three_times(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 41-45: three UPDATEs of the text in one transaction; ids 46-50: three UPDATEs, three transactions."""
    for rev in (2, 3, 4):
        conn.executemany("UPDATE chunks SET content = ? WHERE id = ?",
                         [(f"thrice edited {i} rev {rev}", i) for i in range(41, 46)])
    conn.commit()
    for rev in (2, 3, 4):
        conn.executemany("UPDATE chunks SET content = ? WHERE id = ?",
                         [(f"thrice committed {i} rev {rev}", i) for i in range(46, 51)])
        conn.commit()


@pattern
def update_with_conflict_clause(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 51-60: UPDATE OR ABORT / OR FAIL / OR ROLLBACK / OR REPLACE / OR IGNORE of the text, each twice."""
    ids = iter(range(51, 61))
    for clause in ("ABORT", "FAIL", "ROLLBACK", "REPLACE", "IGNORE"):
        for _ in range(2):
            i = next(ids)
            for rev in (2, 3):
                conn.execute(f"UPDATE OR {clause} chunks SET content = ? WHERE id = ?",
                             (f"update or {clause.lower()} {i} rev {rev}", i))
                conn.commit()


@pattern
def delete_then_reinsert(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 61-70: DELETE then INSERT of the same id with another text, in one transaction; ids 71-75: the same in
    two transactions, twice."""
    for i in range(61, 71):
        conn.execute("DELETE FROM chunks WHERE id = ?", (i,))
        conn.execute("INSERT INTO chunks(id, content) VALUES (?, ?)", (i, f"reinserted paragraph {i}"))
    conn.commit()
    for rev in (2, 3):
        for i in range(71, 76):
            conn.execute("DELETE FROM chunks WHERE id = ?", (i,))
            conn.commit()
            conn.execute("INSERT INTO chunks(id, content) VALUES (?, ?)", (i, f"reinserted paragraph {i} rev {rev}"))
            conn.commit()


@pattern
def delete(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 76-80 one by one, and every row of doc-9 (ids 900-999) in one statement: no vector may remain."""
    conn.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in range(76, 81)])
    conn.execute("DELETE FROM chunks WHERE doc_id = 'doc-9'")
    conn.commit()


@pattern
def update_same_text(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 81-90: UPDATE that sets the text it already has: must NOT re-queue the chunk."""
    conn.execute("UPDATE chunks SET content = content WHERE id BETWEEN 81 AND 90")
    conn.executemany("UPDATE chunks SET content = ? WHERE id = ?",
                     [(f"original paragraph {i}", i) for i in range(81, 91)])
    conn.commit()


@pattern
def update_other_columns(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 91-100: UPDATE of the app's other columns only: must NOT re-queue the chunk."""
    conn.execute("UPDATE chunks SET doc_id = 'moved', position = position + 1000 WHERE id BETWEEN 91 AND 100")
    conn.commit()


@pattern
def insert_or_ignore_existing(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 101-105: INSERT OR IGNORE of existing ids with another text: a no-op for the app, so for batchd."""
    conn.executemany("INSERT OR IGNORE INTO chunks(id, content) VALUES (?, ?)",
                     [(i, f"ignored {i}") for i in range(101, 106)])
    conn.commit()


@pattern
def insert_plain(conn: sqlite3.Connection, sleep: float) -> None:
    """20 new rows without ids."""
    conn.executemany("INSERT INTO chunks(content, doc_id) VALUES (?, 'new')",
                     [(f"brand new paragraph {n}",) for n in range(20)])
    conn.commit()


@pattern
def bulk_update(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 1001-2000: one UPDATE statement rewrites 1,000 texts."""
    conn.execute("UPDATE chunks SET content = content || ' (revised)' WHERE id BETWEEN 1001 AND 2000")
    conn.commit()


@pattern
def long_transaction(conn: sqlite3.Connection, sleep: float) -> None:
    """ids 2001-2100: one transaction that edits, deletes, inserts and holds the write lock ``sleep`` seconds."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("UPDATE chunks SET content = ? WHERE id = ?",
                     [(f"long transaction {i}", i) for i in range(2001, 2101)])
    conn.execute("DELETE FROM chunks WHERE id = 2100")
    conn.execute("INSERT INTO chunks(id, content) VALUES (2100, 'long transaction re-inserted 2100')")
    time.sleep(sleep)
    conn.commit()


def edit_loop(path: str, seed: int, stop: str) -> int:
    """Random edits, each its own transaction, until the file ``stop`` exists; returns the number of edits.

    Every new text is unique (a counter), so "no text is sent in two jobs" stays checkable. Mixes UPDATE of the
    text, DELETE, INSERT, UPSERT and INSERT OR REPLACE of random ids.
    """
    import os
    import random

    rng = random.Random(seed)
    conn = sqlite3.connect(path, timeout=30.0)
    n = 0
    while not os.path.exists(stop):
        top = conn.execute("SELECT coalesce(max(id), 1) FROM chunks").fetchone()[0]
        i, text, roll = rng.randint(1, top), f"edit {seed}-{n}", rng.random()
        if roll < 0.5:
            conn.execute("UPDATE chunks SET content = ? WHERE id = ?", (text, i))
        elif roll < 0.65:
            conn.execute("DELETE FROM chunks WHERE id = ?", (i,))
        elif roll < 0.8:
            conn.execute("INSERT INTO chunks(content) VALUES (?)", (text,))
        elif roll < 0.9:
            conn.execute("INSERT INTO chunks(id, content) VALUES (?, ?) "
                         "ON CONFLICT(id) DO UPDATE SET content = excluded.content", (i, text))
        else:
            conn.execute("INSERT OR REPLACE INTO chunks(id, content) VALUES (?, ?)", (i, text))
        conn.commit()
        n += 1
        time.sleep(rng.uniform(0.005, 0.05))
    conn.close()
    return n


def run(path: str, names: list[str], sleep: float = 0.0) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for name in names:
        conn = sqlite3.connect(path, timeout=30.0)
        try:
            PATTERNS[name](conn, sleep)
            out.append({"pattern": name, "ok": True})
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out.append({"pattern": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            conn.close()
    return out


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--edit-loop"]:  # DB --edit-loop SEED STOPFILE
        print(json.dumps({"edits": edit_loop(argv[0], int(argv[2]), argv[3])}), flush=True)
        return 0
    sleep = 0.0
    if "--sleep" in argv:
        k = argv.index("--sleep")
        sleep = float(argv[k + 1])
        del argv[k:k + 2]
    path, names = argv[0], argv[1:] or list(PATTERNS)
    results = run(path, names, sleep)
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
