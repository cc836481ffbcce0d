"""The `batchd` command: parses arguments, calls the library, prints. No logic of its own.

Exit status: 0 success; 1 the operation failed or was partial (rejected lines, a failed step, a failed check,
a missing database file: only `enqueue`, `run` and `demo` create one; a damaged or read-only database);
2 usage error; 75 (EX_TEMPFAIL) try again later: another batchd process is flushing or syncing this
database, the application held the database's write lock for more than 10 s, or the disk is full;
78 (EX_CONFIG) configuration error, including a config that does not fit the database (another
chunks_vec size, an id column that is not an INTEGER PRIMARY KEY).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson
import structlog

from batchd.backends import Backend, make_backend
from batchd.config import Config, ConfigError, format_duration, load, resolve_path
from batchd.errors import one_line
from batchd.store import (
    Busy,
    DiskFull,
    Missing,
    SchemaMismatch,
    Store,
    StoreError,
    TableRefuses,
    explain,
    is_sqlite_error,
)

EX_TEMPFAIL = 75
EX_CONFIG = 78


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"batchd: {message}", err=True)
    sys.exit(code)


class App:
    """What a command needs, built on first use and closed when the command ends."""

    def __init__(self, config_path: str | None):
        self.config_path = resolve_path(config_path)
        self._config: Config | None = None
        self._store: Store | None = None
        self._backend: Backend | None = None
        self._manager: Any = None
        self.may_create = False  # only enqueue, run and demo create a missing database file
        self.stop = threading.Event()  # set by SIGTERM/SIGINT in the daemon
        self.reload = threading.Event()  # set by SIGHUP in the daemon (`systemctl reload`)

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load(self.config_path)
            except ConfigError as e:
                fail(f"config error: {e}", EX_CONFIG)
        return self._config

    def open_store(self, **options: Any) -> Store:
        """Open the database (see Store.open for ``options``); raises StoreError. Kept for the command."""
        if self._store is None:
            self._store = Store.open(self.config, create=self.may_create, **options)
        return self._store

    def opened_store(self, **options: Any) -> Store:
        """:meth:`open_store`, ending the command on one line when it fails (exit 78 when the config does not
        fit the database, see :func:`fail_store`)."""
        try:
            return self.open_store(**options)
        except StoreError as e:
            fail_store(e, self.config)

    @property
    def store(self) -> Store:
        return self.opened_store()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            try:
                self._backend = make_backend(self.config, self.store.instance_id)
            except ConfigError as e:
                fail(f"config error: {e}", EX_CONFIG)
            except Exception as e:  # noqa: BLE001 - any construction failure is reported on one line
                fail(f"backend {self.config.embedding.backend}: {one_line(e)}")
        return self._backend

    @property
    def manager(self) -> Any:
        if self._manager is None:
            from batchd.manager import BatchManager

            self._manager = BatchManager(self.store, self.backend, self.config)
        return self._manager

    def wait_for_store(self, notifier: Any) -> None:
        """The daemon's way to open the database: wait out a full disk or a busy database (startup.py says how);
        exit 0 if stopped while waiting. Other StoreErrors are raised (the caller reports them)."""
        from batchd.startup import wait_for_database

        if self._store is None:
            store = wait_for_database(lambda: Store.open(self.config, create=self.may_create), notifier, self.stop,
                                      reload=self.reload)
            if store is None:
                sys.exit(0)
            self._store = store

    def setup_logging(self, stream: Any = None) -> None:
        from batchd import logs

        logs.configure(self.config.daemon.log_level, stream=stream if stream is not None else sys.stderr)

    def close(self) -> None:
        closer = getattr(self._backend, "close", None)
        if callable(closer):
            closer()
        if self._store is not None:
            self._store.close()


def fail_store(e: StoreError, config: Config) -> NoReturn:
    """The one line (and exit status) for a database that cannot be used as configured."""
    if isinstance(e, SchemaMismatch):
        fail(f"config error: {config.source}: {e.key}: {e}", EX_CONFIG)
    if isinstance(e, Missing):
        fail(str(e))
    fail_database(config.database.path, e)


def fail_database(path: str, problem: StoreError, note: str = "") -> NoReturn:
    """One line for a database that cannot be used; 75 when trying again later can help (busy, disk full)."""
    fail(f"database error: {path}: {problem}{note}", EX_TEMPFAIL if isinstance(problem, (Busy, DiskFull)) else 1)


class _Commands(click.Group):
    """Every command's database failures (busy, disk full, damaged, read-only) become one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            app = ctx.obj
            config = getattr(app, "_config", None)
            if config is None:
                raise
            problem = explain(e, config.database.path)
            if problem is None and is_sqlite_error(e):
                # Not a known state of the file (sqlite-vec's own errors, say): still one line; the traceback
                # is there for `log_level = "debug"`.
                structlog.get_logger("batchd.cli").debug("cli.database_error", exc_info=True)
                problem = StoreError(f"{one_line(e)} (run `batchd check` to test the file)")
            if problem is None:
                raise
            fail_database(config.database.path, problem)


pass_app = click.make_pass_decorator(App)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH",
              help="Configuration file (default: $BATCHD_CONFIG, else /etc/batchd/batchd.toml).")
@click.version_option(package_name="batchd")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Embed a SQLite table of text chunks with Vertex AI batch jobs (or a local model) into sqlite-vec."""
    from batchd import files

    files.private_umask()  # the database, its -wal/-shm, the lock and job files: owner and group only
    app = App(config_path)
    ctx.obj = app
    ctx.call_on_close(app.close)


@main.command()
@click.argument("file", type=click.File("rb"), default="-")
@pass_app
def enqueue(app: App, file: Any) -> None:
    """Queue texts from JSON Lines: {"id": 17, "text": "..."} per line (id optional).

    Without an id a new row is inserted; with an id an existing row is re-queued when its text changed and left
    alone when it did not. Bad lines, and lines the application's table refuses (a constraint, a trigger), are
    reported with their number and skipped; exit status 1 if any was.
    """
    import collections

    from batchd.ingest import Rejected, read_jsonl_numbered
    from batchd.store import ENQUEUE_SLICE

    app.setup_logging()
    app.may_create = True
    rejected = 0
    name = getattr(file, "name", "-")

    def on_reject(r: Rejected) -> None:
        nonlocal rejected
        rejected += 1
        click.echo(f"batchd: enqueue: {name}:{r.line}: {r.reason}; line skipped", err=True)

    done = 0
    show = sys.stdout.isatty()

    def on_slice(n: int) -> None:
        nonlocal done
        done += n
        if show:
            click.echo(f"\r  queued {done:,} chunks", nl=False)

    numbers: collections.deque[int] = collections.deque(maxlen=2 * ENQUEUE_SLICE)  # of the last rows read
    read = 0

    def rows() -> Any:
        nonlocal read
        for number, cid, text in read_jsonl_numbered(file, on_reject):
            numbers.append(number)
            read += 1
            yield cid, text

    def on_refused(index: int, reason: str) -> None:  # index: of the row in rows(), within the slice just read
        on_reject(Rejected(numbers[index - (read - len(numbers))],
                           f"the table {app.config.database.chunks_table} refused it ({reason})"))

    try:
        counts = app.manager.enqueue(rows(), on_slice=on_slice, on_refused=on_refused)
    except TableRefuses as e:
        if show and done:
            click.echo()
        fail(f"enqueue: {name}: {e}; " + (f"the first {done:,} good lines were queued, the rest were not"
                                          if done else "nothing was queued"))
    except Exception as e:
        # Slices are transactions: say how far it got, so that lines without an id are not queued twice.
        problem = explain(e, app.config.database.path)
        if problem is None or not done:
            raise
        if show:
            click.echo()
        fail_database(app.config.database.path, problem, f" (the first {done:,} good lines were queued; "
                      "the rest were not)")
    if show and done:
        click.echo()
    click.echo(f"inserted={counts.inserted} requeued={counts.requeued} unchanged={counts.unchanged} "
               f"rejected={rejected}")
    if rejected:
        sys.exit(1)


@main.command()
@click.option("--force", is_flag=True, help="Submit whatever is pending, even below min_batch_size (within the budget).")
@click.option("--ignore-budget", is_flag=True, help="Submit even if [budget] says the money for today/this month is spent.")
@pass_app
def flush(app: App, force: bool, ignore_budget: bool) -> None:
    """Claim pending chunks into batch jobs and submit them."""
    app.setup_logging()
    try:
        s = app.manager.flush_queue(force=force, ignore_budget=ignore_budget)
    except Busy as e:
        fail(f"flush: {e}", EX_TEMPFAIL)
    if s.over_budget:
        click.echo(f"budget: {s.budget}; pending chunks wait (flush --ignore-budget to send anyway)")
    ids = s.created
    failed = [n for n in s.not_submitted if n.batch_id in ids]
    click.echo(f"submitted {len(ids) - len(failed)} batch(es)" + (f": {', '.join(map(str, ids))}" if ids else ""))
    for n in failed:
        click.echo(f"batchd: flush: batch {n.batch_id} not submitted ({n.status}): {n.reason}", err=True)
    if failed:
        sys.exit(1)


@main.command()
@pass_app
def sync(app: App) -> None:
    """Poll running jobs and apply the results of finished ones."""
    app.setup_logging()
    try:
        s = app.manager.sync_status()
    except Busy as e:
        fail(f"sync: {e}", EX_TEMPFAIL)
    click.echo(f"checked={s.checked} finished={s.finished} applied={s.applied} retried={s.errored - s.failed} "
               f"failed={s.failed}")
    for err in s.errors:
        click.echo(f"batchd: sync: {err}", err=True)
    if s.errors:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_app
def stats(app: App, as_json: bool) -> None:
    """Queue counts: pending, running (in a batch), ready, failed; batches by status."""
    app.setup_logging()
    st = app.store.queue_stats()
    if as_json:
        click.echo(orjson.dumps(st).decode())
        return
    click.echo(f"pending  {st['pending']:>10,}")
    click.echo(f"running  {st['running']:>10,}")
    click.echo(f"ready    {st['ready']:>10,}")
    if st.get("truncated"):
        click.echo(f"  {st['truncated']:>8,} x input truncated by the service (vector of the first tokens only)")
    click.echo(f"failed   {st['failed']:>10,}")
    for reason, n in app.store.failure_reasons() if st["failed"] else []:
        click.echo(f"  {n:>8,} x {reason}")
    click.echo("batches  " + "  ".join(f"{k.lower()}={v}" for k, v in st["batches"].items()))
    from batchd.cost import spend_line

    click.echo(spend_line(app.store, app.config, time.time()))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one batch per line.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many recent batches.")
@pass_app
def jobs(app: App, as_json: bool, limit: int) -> None:
    """Recent batches: id, status, remote state, counts, age, error."""
    app.setup_logging()
    from batchd.store import parse_iso

    rows = app.store.batches(limit=limit)
    now = time.time()
    if as_json:
        for b in rows:
            click.echo(orjson.dumps(b.__dict__).decode())
        return
    click.echo(f"{'id':>6}  {'status':<9}  {'remote':<19}  {'chunks':>7}  {'done':>7}  {'failed':>6}  "
               f"{'unmatched':>9}  {'age':>6}  error")
    for b in rows:
        created = parse_iso(b.created_at) or now
        click.echo(f"{b.id:>6}  {b.status:<9}  {(b.remote_state or '-'):<19}  {b.total_chunks:>7}  "
                   f"{b.completed_chunks:>7}  {b.failed_chunks:>6}  {b.unmatched_lines:>9}  "
                   f"{format_duration(now - created, exact=False):>6}  {b.error_message or ''}")


@main.command()
# Kept so that scripts written for 0.1 (`batchd retry --failed`) still run; FAILED chunks are all retry acts on.
@click.option("--failed", is_flag=True, hidden=True)
@pass_app
def retry(app: App, failed: bool) -> None:
    """Put FAILED chunks back in the queue with their attempts reset."""
    app.setup_logging()
    n = app.manager.retry_failed()
    click.echo(f"requeued {n} failed chunk(s)")


@main.command()
@click.argument("batch_id", type=int)
@pass_app
def cancel(app: App, batch_id: int) -> None:
    """Cancel a batch (best effort remotely); its chunks go back to PENDING without counting an attempt."""
    from batchd.backends import BackendError

    app.setup_logging()
    try:
        cancelled = app.manager.cancel(batch_id)
    except Busy as e:
        fail(f"cancel: batch {batch_id} may be being submitted right now: {e}", EX_TEMPFAIL)
    except BackendError as e:
        fail(f"cancel: batch {batch_id}: its job could not be cancelled, nothing changed: {one_line(e)}")
    if not cancelled:
        fail(f"cancel: batch {batch_id} does not exist or is already finished")
    click.echo(f"cancelled batch {batch_id}")


@main.command("search")
@click.argument("text")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="How many results.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one result per line (full text).")
@pass_app
def search_cmd(app: App, text: str, k: int, as_json: bool) -> None:
    """Embed TEXT as a query and print the nearest chunks: rank, chunk id, cosine distance, text."""
    from batchd.backends import BackendError
    from batchd.search import search, snippet

    app.setup_logging()
    try:
        hits = search(app.store, app.backend, text, k)
    except BackendError as e:
        fail(f"search: {one_line(e)}")
    for h in hits:
        if as_json:
            click.echo(orjson.dumps(h.as_dict()).decode())
        else:
            click.echo(f"{h.rank:>3}  {h.chunk_id:>8}  {h.distance:.4f}  {snippet(h.text)}")
    if not hits and not as_json:
        click.echo("no results (no chunk has a vector yet: run `batchd flush` and `batchd sync`)", err=True)


@main.command()
@click.option("--dir", "folder", metavar="PATH", type=click.Path(file_okay=False),
              help="Folder for the demo's config and database (default: a new temporary folder).")
def demo(folder: str | None) -> None:
    """Offline demo: embed batchd's own docs with the local model, then run two searches."""
    from batchd import logs
    from batchd.backends import BackendError
    from batchd.demo import DemoError, run_demo
    from batchd.search import snippet

    logs.configure("warning", stream=sys.stderr)
    show = sys.stdout.isatty()

    def progress(st: dict[str, Any]) -> None:
        done, total = st["ready"], st["ready"] + st["pending"] + st["running"] + st["failed"]
        click.echo(f"\r  embedded {done:>4}/{total} chunks" if show else f"  embedded {done}/{total} chunks",
                   nl=not show)

    try:
        r = run_demo(folder, echo=click.echo, progress=progress)
    except ConfigError as e:
        fail(f"config error: {e}", EX_CONFIG)
    except (DemoError, StoreError, BackendError, OSError) as e:
        fail(f"demo: {one_line(e)}")
    if show:
        click.echo()
    st = r.stats
    click.echo(f"done     {st['ready']} ready, {st['pending']} pending, {st['running']} running, {st['failed']} "
               f"failed; batches " + " ".join(f"{k.lower()}={v}" for k, v in st["batches"].items())
               + f" ({r.embed_seconds:.1f}s)")
    for query, hits in r.searches:
        click.echo(f"\nsearch   {query}")
        for h in hits:
            click.echo(f"{h.rank:>3}  {h.chunk_id:>5}  {h.distance:.3f}  {snippet(h.text)}")
    exe = Path(sys.argv[0]) if Path(sys.argv[0]).name == "batchd" else Path(sys.executable).parent / "batchd"
    click.echo(f"\nTry your own: {_shown_path(exe)} --config {r.config_path} search \"why are batch jobs cheaper?\"")
    if not r.ok:
        sys.exit(1)


def _shown_path(p: Path) -> str:
    """The console script as the user would type it: relative to the current folder when below it."""
    try:
        return str(Path(os.path.abspath(p)).relative_to(Path.cwd()))
    except ValueError:
        return str(p)


# `run` lives in its own module.
from batchd.cli_run import run  # noqa: E402 - it imports App from here

main.add_command(run)

# `cost` and `estimate` live in their own module.
from batchd.cli_cost import cost, estimate  # noqa: E402

main.add_command(cost)
main.add_command(estimate)

# check, reset-vectors, uninstall: the commands about batchd's place in the database (their own module).
from batchd.cli_lifecycle import check, reset_vectors, uninstall  # noqa: E402 - they import App from here

main.add_command(check)
main.add_command(reset_vectors)
main.add_command(uninstall)


if __name__ == "__main__":  # pragma: no cover
    main()
