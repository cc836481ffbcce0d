"""The commands about batchd's place in the application's database: `check`, `reset-vectors`, `uninstall`.

`check` changes nothing: it validates the config against the database and lists what the first run will create
or migrate. `reset-vectors` and `uninstall` say what they would do and change nothing without ``--yes``; with it
they take the worker lock (exit 75 while another batchd process flushes or syncs), cancel the batches in flight
and make their change in one transaction (store/lifecycle.py).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import click
import structlog

from batchd.backends import Backend, Checkable, make_backend
from batchd.cli import EX_CONFIG, EX_TEMPFAIL, App, fail, fail_store, pass_app
from batchd.config import Config, ConfigError, format_duration
from batchd.errors import one_line
from batchd.store import Busy, Store, StoreError, lock_path

log = structlog.get_logger("batchd.cli")


@click.command()
@click.option("--live", is_flag=True,
              help="Also run a tiny real job (3 fixed texts, never your chunks) and verify what comes back.")
@click.option("--timeout", "timeout", default="30m", show_default=True, metavar="DURATION",
              help="With --live: how long to wait for the job (then it is cancelled).")
@click.option("--keep", is_flag=True, help="With --live: leave the job's staged files for inspection.")
@click.option("--poll", default="10s", show_default=True, metavar="DURATION",
              help="With --live: the pause between status checks.")
@pass_app
def check(app: App, live: bool, timeout: str, keep: bool, poll: str) -> None:
    """Validate the config and the database (changing nothing: it lists what the first run will create or
    migrate), run SQLite's integrity check, and check the backend. Exit 0 when all is well; 1 when something
    fails, a missing database file included; 78 when the config does not fit the database.

    With --live, a 3-text job runs end to end through the same code path as real batches; Ctrl-C cancels it
    and deletes its files (exit 130)."""
    from batchd.config import parse_duration

    try:
        timeout_s, poll_s = parse_duration(timeout), parse_duration(poll)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--timeout/--poll") from None
    cfg = app.config  # exits 78 on a config error
    app.setup_logging()
    click.echo(f"ok    config {app.config_path}")
    problems = 0
    try:
        ins = Store.inspect(cfg)
    except StoreError as e:
        fail_store(e, cfg)  # 78 for a config that does not fit the database, else one line and 1
    path = cfg.database.path
    how, found = ins.integrity
    if not ins.exists:
        click.echo(f"FAIL  database {path} does not exist (check database.path; `batchd enqueue` or `batchd run` "
                   "creates it)")
        problems += 1
    elif found:
        click.echo(f"FAIL  database integrity ({how}): {len(found)}{'+' if len(found) >= 20 else ''} problem(s), "
                   f"first: {found[0]}; restore a backup or rebuild it with the sqlite3 shell's .recover")
        problems += 1
    else:
        vec = f"chunks_vec {ins.vec_dimensions} dimensions" if ins.vec_dimensions else "no chunks_vec yet"
        click.echo(f"ok    database {path} (sqlite {ins.sqlite_version}, sqlite-vec {ins.vec_version}, "
                   f"schema {ins.schema_version}, instance {ins.instance_id or 'not yet'}, {vec}, "
                   f"{ins.rows if ins.rows is not None else 0:,} chunks)")
        click.echo(f"ok    database integrity ({how}): no problems found")
    if ins.changes:
        click.echo(f"plan  the first `batchd run` or `batchd enqueue` will ({len(ins.changes)} changes; "
                   "check made none):")
        for ch in ins.changes:
            click.echo(f"plan    {ch}")
    elif not found:
        click.echo("ok    schema up to date (nothing to create or migrate)")
    problems += _check_service_files(cfg)
    try:
        backend = make_backend(cfg, ins.instance_id or "")
    except ConfigError as e:
        fail(f"config error: {e}", EX_CONFIG)
    except Exception as e:  # noqa: BLE001
        click.echo(f"FAIL  backend {cfg.embedding.backend}: {one_line(e)}")
        sys.exit(1)
    missing = getattr(backend, "missing_settings", ())  # the backend says what it cannot work without
    for line in missing:
        click.echo(f"FAIL  {cfg.embedding.backend}: {line}")
    if missing:  # nothing below could work without them
        sys.exit(1)
    click.echo(f"ok    backend {cfg.embedding.backend} constructed ({cfg.embedding.model}, {cfg.embedding.dimensions} dims)")
    if isinstance(backend, Checkable):
        for r in backend.check():
            mark = "FAIL" if not r.ok else "warn" if r.warning else "ok  "
            click.echo(f"{mark}  {r.name}" + (f": {r.detail}" if r.detail else ""))
            problems += 0 if r.ok else 1
    status = 1 if problems else 0
    try:
        if live and not problems:
            status = _live_check(backend, cfg, timeout_s, keep, poll_s)
        elif live:
            click.echo("FAIL  live check: not run while the checks above fail")
    finally:
        closer = getattr(backend, "close", None)
        if callable(closer):
            closer()
    if status:
        sys.exit(status)


def _check_service_files(cfg: Config) -> int:
    """Print what `check` finds about the interpreter and the database files (a service that could not write
    them would fail its start); return the number of FAILs."""
    from batchd import files

    problem = files.interpreter_problem()
    if problem:
        click.echo(f"WARN  python: {problem}")
    failed = 0
    for f in files.access_problems(cfg.database.path):
        click.echo(f"{ {'ok': 'ok  ', 'warn': 'WARN', 'fail': 'FAIL'}[f.level]}  {f.name}: {f.detail}")
        failed += f.level == "fail"
    return failed


def _live_check(backend: Backend, cfg: Config, timeout: float, keep: bool, poll: float) -> int:
    from batchd.livecheck import run_live_check

    show = sys.stderr.isatty()
    last: list[str] = []

    def waiting(state: str, elapsed: float) -> None:
        if show:
            click.echo(f"\r      waiting for the job: {state:<20} {format_duration(elapsed, exact=False):>6}",
                       nl=False, err=True)
        elif last != [state]:
            click.echo(f"      waiting for the job: {state} after {format_duration(elapsed, exact=False)}", err=True)
        last[:] = [state]

    def echo(line: Any) -> None:
        if show and last:
            click.echo(err=True)
            last.clear()
        click.echo(str(line))

    emb = cfg.embedding
    res = run_live_check(backend, emb.model, emb.task_type, emb.dimensions, timeout=timeout, keep=keep, poll=poll,
                         echo=echo, waiting=waiting)
    if res.interrupted:
        return 130
    return 0 if res.ok else 1



def _dry_run(command: str, would: str, plan: list[str], kept: str) -> None:
    """What a destructive command without ``--yes`` prints: what it would do, what it keeps, how to do it."""
    click.echo(f"{command} {would}")
    for line in plan:
        click.echo(f"  {line}")
    click.echo(kept)
    click.echo(f"Nothing changed: run `batchd {command} --yes` to do it (stop the service first).")


@contextlib.contextmanager
def _locked(store: Store, command: str) -> Iterator[None]:
    """The worker lock around a destructive command's change: while another batchd process flushes or syncs,
    one line naming the command and exit 75 (nothing changed)."""
    try:
        with store.worker_lock():
            yield
    except Busy as e:
        fail(f"{command}: {e}", EX_TEMPFAIL)


@click.command("reset-vectors")
@click.option("--yes", is_flag=True, help="Do it. Without --yes: say what would be done and change nothing.")
@pass_app
def reset_vectors(app: App, yes: bool) -> None:
    """Drop every vector and embed all chunks again (after changing embedding.model or embedding.dimensions).

    Drops chunks_vec and creates it for the configured dimensions, cancels the batches in flight, and sends every
    chunk back to PENDING with its attempts reset. Texts and the application's columns are kept. Refuses (exit 75)
    while another batchd process is flushing or syncing: stop the service first.
    """
    app.setup_logging()
    cfg = app.config
    store = app.opened_store(check_dimensions=False)
    s = store.reset_summary()
    old = f"{s['vectors']:,} vectors of {s['database_dimensions']} dimensions" if s["database_dimensions"] \
        else "no vector table yet"
    plan = ([f"cancel {len(s['in_flight'])} batch(es) in flight: {', '.join(map(str, s['in_flight']))}"]
            if s["in_flight"] else [])
    plan += [f"drop chunks_vec ({old})",
             f"create chunks_vec for {s['dimensions']} dimensions (embedding.dimensions)",
             f"send all {s['chunks']:,} chunks back to PENDING, attempts reset, to be embedded with "
             f"{cfg.embedding.model}"]
    if not yes:
        _dry_run("reset-vectors", f"would, in {cfg.database.path}:", plan,
                 "Texts and your table's other columns are kept.")
        return
    with _locked(store, "reset-vectors"):
        _cancel_in_flight(app, store, s["in_flight"], "reset-vectors")
        n = store.reset_vectors(time.time())
    log.info("vectors.reset", dropped_vectors=s["vectors"], old_dimensions=s["database_dimensions"],
             dimensions=s["dimensions"], model=cfg.embedding.model, requeued=n, cancelled_batches=s["in_flight"])
    click.echo(f"reset-vectors: dropped {s['vectors']:,} vectors; chunks_vec is now {s['dimensions']} dimensions; "
               f"{n:,} chunks PENDING")


@click.command()
@click.option("--yes", is_flag=True, help="Do it. Without --yes: list what would be removed and change nothing.")
@pass_app
def uninstall(app: App, yes: bool) -> None:
    """Remove batchd from the database: its triggers, indexes, tables (vectors included) and the columns it added
    to the application's table. The application's own columns and rows stay exactly as they are. Refuses (exit
    75) while another batchd process is flushing or syncing: stop and disable the service first."""
    app.setup_logging()
    cfg = app.config
    store = app.opened_store(migrate=False)
    plan = store.uninstall_plan()
    if not plan:
        click.echo(f"uninstall: nothing of batchd's is in {cfg.database.path}")
        return
    if not yes:
        _dry_run("uninstall", f"would remove from {cfg.database.path}:",
                 [f"{ch.kind.replace('_', ' ')} {ch.name}" for ch in plan],
                 f"Your table {cfg.database.chunks_table} keeps its own columns and rows.")
        return
    try:
        with _locked(store, "uninstall"):
            in_flight = [b.id for b in store.batches(["PENDING", "RUNNING"])] if store.table_exists("batch_jobs") else []
            _cancel_in_flight(app, store, in_flight, "uninstall")
            removed = store.uninstall()
    except StoreError as e:
        fail(f"uninstall: {e}")
    log.info("batchd.uninstalled", database=cfg.database.path, removed=[f"{c.kind} {c.name}" for c in removed])
    click.echo(f"uninstall: removed {len(removed)} objects from {cfg.database.path}; "
               f"{cfg.database.chunks_table} keeps its own columns and rows")
    click.echo(f"Left for you to delete: the lock file {lock_path(cfg.database.path)}, the config, and (local "
               f"backend) {cfg.state_dir / 'local-jobs'}")


def _cancel_in_flight(app: App, store: Store, batch_ids: list[int], command: str) -> None:
    """Cancel the remote jobs of the batches in flight (as `batchd cancel` does), so none keeps running and
    billing after its vectors are gone. Exits 1 (the database not reset or uninstalled) when one cannot be."""
    if not batch_ids:
        return
    from batchd.backends import BackendError
    from batchd.manager import BatchManager

    advice = (f"nothing was changed by {command}; try again, or cancel the batch with `batchd cancel` under the "
              "config that submitted it")
    try:
        backend: Any = make_backend(app.config, store.instance_id)
    except Exception as e:  # noqa: BLE001 - one line for the operator
        fail(f"{command}: cannot reach the backend to cancel batches in flight {batch_ids} ({one_line(e)}); {advice}")
    try:
        manager = BatchManager(store, backend, app.config)
        for batch_id in batch_ids:
            try:
                manager.cancel(batch_id)
            except BackendError as e:
                fail(f"{command}: cannot cancel batch {batch_id}'s remote job ({one_line(e)}); {advice}")
    finally:
        closer = getattr(backend, "close", None)
        if callable(closer):
            closer()
