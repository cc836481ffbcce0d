"""The cost ledger, `batchd cost`, `batchd estimate`, the budget and the size limits, on real SQLite with the
file-backed test backend (which reports one token per word of each answered text) — and once through the REAL
VertexBackend against the fake Vertex, whose output lines carry `statistics.token_count`."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from batchd.cli import main
from batchd.cost import budget_state, cost_report, estimate
from batchd.pricing import BUILT_IN, billable_characters, price_for
from tests.configs import MEMBACKEND_EMBEDDING, assert_refused, write_config
from tests.fakes.membackend import read_counters
from tests.fakes.vertex_env import BUCKET, fake_vertex, gcs, vworld
from tests.storehelp import store_chunks

PRICED = {"model": "test-model", "unit": "1k_characters", "batch_usd": 0.5, "online_usd": 1.0}
TOKEN_PRICED = {"model": "test-model", "unit": "1m_tokens", "batch_usd": 1000.0, "online_usd": 2000.0}


def enqueue(w: Any, texts: list[str]) -> None:
    w.manager.enqueue([(None, t) for t in texts])


def bill(texts: list[str]) -> int:
    return sum(len("".join(t.split())) for t in texts)


def words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def write_toml(w: Any, tmp_path, **sections: dict[str, Any]) -> str:
    """A config file for the CLI with ``w``'s database, batch size and prices, and ``sections``."""
    price = w.config.pricing
    return str(write_config(tmp_path / "cli.toml", {
        "database": {"path": w.config.database.path},
        "queue": {"min_batch_size": 1, "max_batch_size": w.config.queue.max_batch_size},
        "embedding": MEMBACKEND_EMBEDDING,
        "pricing": {"model": "test-model", "unit": price.unit, "batch_usd": price.batch_usd,
                    "online_usd": price.online_usd},
        **sections}))


def cli(config: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", config, *args], catch_exceptions=False)


def test_billable_rule_and_every_supported_model_has_a_dated_sourced_price():
    # Google: code points, white space excluded (pricing.py cites the page).
    assert billable_characters("a b\tc\n\u00e9\u3000d ") == 5
    assert billable_characters("") == 0
    for model in ("text-embedding-005", "text-embedding-004", "text-multilingual-embedding-002",
                  "gemini-embedding-001"):
        p = BUILT_IN[model]
        assert p.batch_usd is not None and p.online_usd is not None and p.date and p.source.startswith(("http", "Google"))
    assert BUILT_IN["gemini-embedding-001"].batch_usd == 0.075 and BUILT_IN["gemini-embedding-001"].online_usd == 0.15


def test_ledger_counts_what_was_sent_and_answered_resends_included_and_prices_it_exactly(world, tmp_path):
    w = world(pricing=PRICED)
    first = ["alpha beta gamma", "alpha beta gamma", "one two", "will fail at first", "  spaced   out  text "]
    w.knobs(fail_texts=["will fail"])
    enqueue(w, first)
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    # Second round: the failed line is sent again; a chunk whose text is READY is copied locally.
    w.knobs()
    enqueue(w, ["one two", "brand new words here"])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()

    distinct1 = ["alpha beta gamma", "one two", "will fail at first", "  spaced   out  text "]
    answered1 = ["alpha beta gamma", "one two", "  spaced   out  text "]
    round2 = ["will fail at first", "brand new words here"]
    rows = [b for b in w.store.batches()]
    assert [b.status for b in rows] == ["COMPLETED", "COMPLETED"]
    assert read_counters(w.dir)["lines_sent"] == len(distinct1) + len(round2)

    r = cost_report(w.store, w.config, None)
    sent = distinct1 + round2
    answered = answered1 + round2
    assert r["batches"] == 2
    assert r["rows"] == len(sent) == 6
    assert r["characters"] == sum(len(t) for t in sent)
    assert r["billable_characters"] == bill(answered)
    assert r["tokens"] == words(answered)  # exactly what the backend reported per answered line
    assert r["cost_usd"] == pytest.approx(bill(answered) / 1000 * 0.5, rel=1e-12)
    assert r["online_cost_usd"] == pytest.approx(bill(answered) / 1000 * 1.0, rel=1e-12)
    # One duplicate inside batch 1 and one local copy ("one two"): both spared at the online price.
    assert r["rows_deduplicated"] == 2
    spared = (bill(["alpha beta gamma"]) + bill(["one two"])) / 1000 * 1.0
    assert r["saved_usd"] == pytest.approx(r["online_cost_usd"] - r["cost_usd"] + spared, rel=1e-12)
    assert set(r["by_model"]) == {"test-model"} and r["by_model"]["test-model"]["rows"] == 6

    # The CLI prints the same object, full precision, with exactly these keys.
    out = cli(write_toml(w, tmp_path), "cost", "--json")
    assert out.exit_code == 0, out.output
    j = orjson.loads(out.output)
    assert set(j) == {"batches", "rows", "characters", "billable_characters", "tokens", "cost_usd",
                      "online_cost_usd", "saved_usd", "rows_deduplicated", "by_model"}
    assert j["cost_usd"] == r["cost_usd"] and j["tokens"] == r["tokens"]
    text = cli(write_toml(w, tmp_path), "cost", "--since", "1d")
    assert text.exit_code == 0 and "saved" in text.output
    assert cli(write_toml(w, tmp_path), "cost", "--since", "soon").exit_code == 2


def test_token_priced_cost(world):
    w = world(pricing=TOKEN_PRICED)
    texts = ["a b c d", "e f", "g"]
    enqueue(w, texts)
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    r = cost_report(w.store, w.config, None)
    assert r["tokens"] == 7 and r["cost_usd"] == pytest.approx(7 / 1e6 * 1000.0, rel=1e-12)
    assert r["online_cost_usd"] == pytest.approx(7 / 1e6 * 2000.0, rel=1e-12)


def test_a_model_without_a_known_price_has_cost_null(world):
    u = world()
    assert price_for(u.config).batch_usd is None
    enqueue(u, ["x y"])
    u.manager.flush_queue(force=True)
    u.manager.sync_status()
    r = cost_report(u.store, u.config, None)
    assert r["cost_usd"] is None and r["online_cost_usd"] is None and r["saved_usd"] is None
    assert r["rows"] == 1 and r["tokens"] == 2


def test_estimate_is_exact_for_what_flush_then_sends_and_changes_nothing(world, tmp_path):
    w = world(pricing=PRICED, queue={"max_batch_size": 3})
    enqueue(w, ["already here", "x y"])
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    pending = ["already here", "new one", "new one", "third text", "fourth", "fifth  text"]
    enqueue(w, pending)
    # Rows the application inserted itself are not hashed yet: estimate hashes them in memory only.
    app = w.app_connect()
    app.execute("INSERT INTO chunks(content) VALUES ('sixth from the app')")
    app.commit()
    app.close()
    path = w.config.database.path

    def dump() -> tuple:
        conn = w.store.sqlite_module.connect(path)
        try:
            return (conn.execute("SELECT * FROM chunks ORDER BY id").fetchall(),
                    conn.execute("SELECT * FROM batch_jobs ORDER BY id").fetchall(),
                    conn.execute("SELECT count(*) FROM batchd_copies").fetchall())
        finally:
            conn.close()

    before = dump()
    e = estimate(w.store, w.config, w.manager.hash_text)
    assert dump() == before  # read-only: not even the local copy happened
    to_send = ["new one", "third text", "fourth", "fifth  text", "sixth from the app"]
    assert e.chunks == 7 and e.copied_locally == 1 and e.to_send == 5
    assert e.characters == sum(len(t) for t in to_send) and e.billable_characters == bill(to_send)
    assert e.tokens_estimate == sum(math.ceil(len(t) / 4) for t in to_send)
    assert e.cost_usd == pytest.approx(bill(to_send) / 1000 * 0.5, rel=1e-12)
    assert e.jobs == 2  # 6 chunks to claim ("new one" twice), 3 per job

    out = cli(write_toml(w, tmp_path, budget={"daily_usd": 5.0}), "estimate", "--json")
    assert out.exit_code == 0, out.output
    assert orjson.loads(out.output) == e.as_dict()
    assert dump() == before
    assert "budget   today" in cli(write_toml(w, tmp_path, budget={"daily_usd": 5.0}), "estimate").output

    # What the estimate said is what flush then sends and the ledger records.
    w.manager.flush_queue(force=True)
    w.manager.sync_status()
    r = cost_report(w.store, w.config, None)
    assert r["batches"] == 3  # 1 before + the 2 jobs estimated
    new = [b for b in w.store.batches() if b.id > 1]
    conn = w.store.sqlite_module.connect(path)
    sent = conn.execute("SELECT sum(rows_sent), sum(characters_sent), sum(billable_characters) FROM batch_jobs "
                        "WHERE id > 1").fetchone()
    conn.close()
    assert len(new) == e.jobs and sent == (e.to_send, e.characters, e.billable_characters)


def test_budget_blocks_flush_splits_to_fit_and_ignore_budget_overrides(world, tmp_path):
    # 0.5 USD per 1,000 billable characters: a 100-character text costs 0.05.
    w = world(pricing=PRICED, budget={"daily_usd": 0.12})
    texts = [f"{i:02d}" + "x" * 98 for i in range(5)]
    enqueue(w, texts)
    ids = w.manager.flush_queue(force=True).created  # --force does not bypass the budget
    assert len(ids) == 1 and w.store.batch(ids[0]).total_chunks == 2  # split to fit: 2 x 0.05 <= 0.12
    assert w.manager.get_queue_stats()["pending"] == 3
    s = w.manager.flush_queue(force=True)
    assert s.created == [] and s.over_budget and s.budget == "today $0.1000 of $0.1200"  # 0.02 left: no fit
    assert s.as_dict()["over_budget"] is True
    assert w.manager.get_queue_stats()["pending"] == 3

    # Once applied, the billed cost counts instead of the estimate (set higher here by hand; a real case is below).
    w.manager.sync_status()
    conn = w.store.sqlite_module.connect(w.config.database.path)
    conn.execute("UPDATE batch_jobs SET cost_usd = 0.2 WHERE id = ?", (ids[0],))
    conn.commit()
    conn.close()
    st = budget_state(w.store, w.config, w.clock())
    assert st.spent_today == pytest.approx(0.2) and st.over and st.until == st.day + 86400
    from batchd.daemon import Worker

    assert "spent today $0.2000; over budget until " in Worker(w.manager).status_line()

    cfg = write_toml(w, tmp_path, budget={"daily_usd": 0.12})
    out = cli(cfg, "flush", "--force")
    assert out.exit_code == 0 and "over budget until" in out.output and "submitted 0" in out.output
    stats = cli(cfg, "stats")
    assert "spend    today $0.2000" in stats.output and "over budget until" in stats.output
    out = cli(cfg, "flush", "--ignore-budget")
    assert out.exit_code == 0 and "submitted 1 batch(es)" in out.output
    assert w.manager.get_queue_stats()["pending"] == 0


def test_over_budget_is_logged_each_time_by_hand_and_once_per_period_by_the_daemon(world):
    import structlog

    w = world(pricing=PRICED, budget={"daily_usd": 0.01})
    enqueue(w, ["y" * 100])
    with structlog.testing.capture_logs() as logs:
        w.manager.flush_queue(force=True)
        w.manager.flush_queue(force=True)
    assert [e["event"] for e in logs].count("flush.over_budget") == 2
    w.manager.accounting.warn_once = True
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            w.manager.flush_queue(force=True)
    assert [e["event"] for e in logs].count("flush.over_budget") == 1
    w.clock.advance(86400)  # a new UTC day: said again, once
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            w.manager.flush_queue(force=True)
    assert [e["event"] for e in logs].count("flush.over_budget") == 1
    with structlog.testing.capture_logs() as logs:
        assert w.manager.flush_queue(force=True, ignore_budget=True).created != []
    assert "flush.budget_ignored" in [e["event"] for e in logs]


def test_jobs_split_at_max_batch_characters(world):
    w = world(queue={"max_batch_characters": 250})
    enqueue(w, ["a" * 100, "b" * 100, "c" * 100, "d" * 400, "e" * 10])
    ids = w.manager.flush_queue(force=True).created
    totals = [w.store.batch(i).total_chunks for i in ids]
    assert totals == [2, 1, 1, 1]  # a+b | c | d alone (over the limit by itself: a job of its own, never stuck) | e



@pytest.mark.parametrize("auto_truncate", [True, False])
def test_a_text_over_the_input_limit_is_flagged_and_sent_or_failed_before_sending(world, auto_truncate):
    import structlog

    limit = 2048 * 4  # the model's 2,048 tokens at ~4 characters per token
    if auto_truncate:
        t = world()
        with structlog.testing.capture_logs() as logs:
            enqueue(t, ["q" * (limit + 1), "short"])
            assert t.manager.flush_queue(force=True).created == [1]
        assert any(e["event"] == "batch.over_input_limit" and e["chunks"] == 1 for e in logs)
        assert t.store.batch(1).total_chunks == 2
        return
    v = world(embedding={"auto_truncate": False})
    enqueue(v, ["short", "z" * (limit + 1)])
    v.manager.flush_queue(force=True)
    failed = [c for c in store_chunks(v.store) if c["embedding_status"] == "FAILED"]
    assert len(failed) == 1 and "input limit" in failed[0]["error_message"] and "auto_truncate" in failed[0]["error_message"]
    assert read_counters(v.dir)["lines_sent"] == 1  # only "short" went out


def test_vertex_tokens_in_the_ledger_are_what_the_fake_service_reported(vworld):
    w = vworld(vertex={"cleanup": False})
    w.fake.shuffle, w.fake.split = True, 2
    texts = [f"vertex text {i} with {'some ' * (i % 5)}words" for i in range(40)] + ["vertex text 0 with words"]
    enqueue(w, texts)
    assert w.manager.flush_queue(force=True).created == [1]
    w.fake.finish()
    w.manager.sync_status()
    assert w.store.batch(1).status == "COMPLETED"

    reported = 0  # the token counts in the output files the fake service wrote
    for name in w.objects(1):
        if "/output/" in name and name.endswith(".jsonl"):
            for raw in w.gcs.read(BUCKET, name).splitlines():
                reported += orjson.loads(raw)["predictions"][0]["embeddings"]["statistics"]["token_count"]
    r = cost_report(w.store, w.config, None)
    distinct = sorted(set(texts))
    assert r["rows"] == 40 and r["rows_deduplicated"] == 1
    assert r["characters"] == sum(len(t) for t in distinct) and r["billable_characters"] == bill(distinct)
    assert reported > 0 and r["tokens"] == reported
    price = BUILT_IN["text-embedding-005"]
    assert r["cost_usd"] == pytest.approx(bill(distinct) / 1000 * price.batch_usd, rel=1e-12)
    assert r["online_cost_usd"] == pytest.approx(bill(distinct) / 1000 * price.online_usd, rel=1e-12)


def test_a_database_made_before_the_ledger_is_upgraded_and_its_old_batches_are_left_out(make_config):
    from batchd.store import SCHEMA_VERSION, Store
    from batchd.store.ledger import LEDGER_COLUMNS

    cfg = make_config(pricing=PRICED)
    store = Store.open(cfg)
    conn = store._conn  # test-only: rewind to schema 4 (before m005, the ledger) with a batch closed back then
    conn.execute("DROP TABLE batchd_copies")
    conn.execute("DROP INDEX batch_jobs_created_at")
    for name, _ in LEDGER_COLUMNS:
        conn.execute(f"ALTER TABLE batch_jobs DROP COLUMN {name}")
    conn.execute("INSERT INTO batch_jobs(status, model, total_chunks, completed_chunks, token_count, created_at, "
                 "updated_at) VALUES ('COMPLETED', 'test-model', 5, 5, 40, '2026-11-29T10:00:00Z', '2026-11-29T10:00:00Z')")
    conn.execute("UPDATE batchd_meta SET value = '4' WHERE key = 'schema_version'")
    store.close()

    store = Store.open(cfg)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert {n for n, _ in LEDGER_COLUMNS} <= set(store.table_columns("batch_jobs"))
        r = cost_report(store, cfg, None)
        assert r["batches"] == 0 and r["cost_usd"] == 0.0  # nothing known about it: left out, not "unknown"
        assert store.spend_since(0) == (0.0, False)
    finally:
        store.close()


@pytest.mark.parametrize("body, key, reason", [
    ("[budget]\ndaily_usd = -1", "budget.daily_usd", "0 (no limit) or more"),
    ("[budget]\nmonthly_usd = \"5\"", "budget.monthly_usd", "expected a number"),
    ("[pricing]\nmodel = \"m\"\nunit = \"per_row\"", "pricing.unit", "1k_characters"),
    ("[pricing]\nmodel = \"m\"\nbatch_usd = -0.1", "pricing.batch_usd", "0 or more"),
    ("[metrics]\nlisten = \"9464\"", "metrics.listen", "host:port"),
    ("[metrics]\ntextfile = \"/tmp/batchd.txt\"", "metrics.textfile", ".prom"),
    ("[queue]\nmax_batch_characters = -5", "queue.max_batch_characters", "0 (no limit)"),
    ("[embedding]\nauto_truncate = \"no\"", "embedding.auto_truncate", "true or false"),
])
def test_money_and_metrics_settings_are_validated(tmp_path, body, key, reason):
    assert_refused(tmp_path, body + "\n", key, reason)


def test_a_claimed_batch_whose_submit_failed_still_counts_against_the_budget(world):
    w = world(pricing=PRICED, budget={"daily_usd": 0.06})
    w.knobs(submit_errors=2)
    enqueue(w, ["k" * 100])
    assert w.manager.flush_queue(force=True).created == [1]  # claimed, submit failed: it stays PENDING for recovery
    assert w.store.batch(1).status == "PENDING" and not w.store.batch(1).google_job_id
    enqueue(w, ["m" * 100])
    # The recovery's resubmit fails too; 0.05 of the 0.06 is still committed to batch 1: the second text waits.
    assert w.manager.flush_queue(force=True).created == []
    assert w.store.batch(1).status == "PENDING" and w.manager.get_queue_stats()["pending"] == 1
    assert w.manager.flush_queue(force=True).created == []  # batch 1 submitted by recovery; still no room for a second
    assert w.store.batch(1).status == "RUNNING" and w.manager.get_queue_stats()["pending"] == 1


def test_run_until_idle_stops_when_the_budget_holds_the_rest_back(world):
    from batchd.daemon import EXIT_OK, Worker, run_until_idle

    w = world(pricing=PRICED, budget={"daily_usd": 0.06})
    enqueue(w, ["u" * 100, "v" * 100, "w" * 100])
    assert run_until_idle(Worker(w.manager, clock=w.clock), 0.01) == EXIT_OK  # instead of polling forever
    st = w.manager.get_queue_stats()
    assert st["ready"] == 1 and st["pending"] == 2 and st["running"] == 0


def test_a_batch_dearer_than_estimated_is_recorded_as_billed_and_the_next_flush_sees_it(world):
    # Token-priced: the estimate takes 4 characters per token, the service bills what it counted (here one token
    # per word: "a b c d e f g h" is 15 characters, estimated 4 tokens, billed 8).
    w = world(pricing=TOKEN_PRICED, budget={"daily_usd": 0.014}, queue={"max_batch_size": 1})
    text = "a b c d e f g h"
    enqueue(w, [text, text.upper(), "i j k l m n o p"])
    assert w.manager.flush_queue(force=True).created == [1, 2, 3]  # 3 x 4 tokens x $1000/1M = $0.012 estimated
    st = budget_state(w.store, w.config, w.clock())
    assert st.spent_today == pytest.approx(0.012)
    w.manager.sync_status()
    b = w.store.batch(1)
    assert b.token_count == 8
    conn = w.store.sqlite_module.connect(w.config.database.path)
    est, billed = conn.execute("SELECT estimated_cost_usd, cost_usd FROM batch_jobs WHERE id = 1").fetchone()
    conn.close()
    assert est == pytest.approx(0.004) and billed == pytest.approx(0.008)  # recorded as billed, not as estimated
    st = budget_state(w.store, w.config, w.clock())
    assert st.spent_today == pytest.approx(0.024) and st.over  # the real spend: over the 0.014 cap now
    enqueue(w, ["q r"])
    assert w.manager.flush_queue(force=True).created == []


def test_packer_splits_at_the_models_input_bytes(make_config):
    from batchd.cost import packer

    cfg = make_config(embedding={"model": "gemini-embedding-001", "dimensions": 16})
    p = packer(cfg)
    assert p.max_bytes == 1_000_000_000 and p.max_rows == 1000  # queue.max_batch_size caps the 1,000,000 rows
    p.max_bytes = 1000  # the same rule at a size a test can reach: 256 bytes of JSON around each text
    assert p.offer("k1", "é" * 200)  # 400 bytes of UTF-8 + 256
    assert not p.offer("k2", "x" * 100) and p.declined_for == "size"  # 656 + 356 > 1000
    assert p.offer("k1", "é" * 200)  # a duplicate rides free (sent once)
    assert (p.rows, p.texts, p.bytes) == (2, 1, 656)
