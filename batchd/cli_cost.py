"""`batchd cost` and `batchd estimate`: what batchd cost and saved, and what the pending queue would cost. They parse,
call :mod:`batchd.cost` and print; batchd.cli adds them to the `batchd` group (``ctx.obj`` is its App)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click
import orjson

from batchd.backends import content_hash

if TYPE_CHECKING:  # pragma: no cover
    from batchd.cli import App


@click.command()
@click.option("--since", default="30d", show_default=True, metavar="PERIOD",
              help="How far back: a duration (30d, 12h, 2w) or a UTC date (2026-11-01).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (amounts at full precision).")
@click.pass_obj
def cost(app: App, since: str, as_json: bool) -> None:
    """What batchd cost and saved: batches, rows and characters sent, billed tokens/characters, USD by model."""
    from batchd.cost import cost_report, parse_since, usd

    app.setup_logging()
    now = time.time()
    try:
        start = parse_since(since, now)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    r = cost_report(app.store, app.config, start)
    if as_json:
        click.echo(orjson.dumps(r).decode())
        return
    click.echo(f"since    {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}")
    click.echo(f"cost     {usd(r['cost_usd'])} (online would have been {usd(r['online_cost_usd'])}; "
               f"saved {usd(r['saved_usd'])}, {r['rows_deduplicated']:,} rows deduplicated or copied locally)")
    click.echo(f"sent     {r['batches']:,} batches, {r['rows']:,} rows, {r['characters']:,} characters; billed "
               f"{r['billable_characters']:,} characters, {r['tokens']:,} tokens")
    for model, m in r["by_model"].items():
        click.echo(f"  {model or '(no model)'}: {usd(m['cost_usd'])}, {m['batches']:,} batches, {m['rows']:,} rows, "
                   f"{m['tokens']:,} tokens, {m['billable_characters']:,} billable characters")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def estimate(app: App, as_json: bool) -> None:
    """What flushing the pending chunks now would send and cost. Changes nothing."""
    from batchd.cost import budget_state, usd
    from batchd.cost import estimate as estimate_queue
    from batchd.pricing import CHARS_PER_TOKEN, price_for

    app.setup_logging()
    emb = app.config.embedding
    # Hashes as the manager makes them, without constructing a backend (no credentials needed, nothing sent).
    e = estimate_queue(app.store, app.config, lambda t: content_hash(t, emb.model, emb.task_type, emb.dimensions))
    if as_json:
        click.echo(orjson.dumps(e.as_dict()).decode())
        return
    price = price_for(app.config)
    click.echo(f"pending  {e.chunks:,} chunks: {e.to_send:,} distinct texts to send, {e.copied_locally:,} copied locally")
    click.echo(f"size     {e.characters:,} characters ({e.billable_characters:,} billable), "
               f"~{e.tokens_estimate:,} tokens, {e.jobs:,} job(s)")
    how = {"1m_tokens": f"tokens estimated at {CHARS_PER_TOKEN} characters each; the service reports the real count",
           "1k_characters": "billable characters: code points, white space excluded",
           "none": "runs on this machine"}[price.unit]
    click.echo(f"cost     {usd(e.cost_usd)} at the batch price of {app.config.embedding.model} ({how})")
    st = budget_state(app.store, app.config, time.time())
    if st.limited:
        click.echo(f"budget   {st.describe()}")
