"""`batchd run`: the worker as a daemon (systemd Type=notify), or one cycle (`--once`), or until the queue is
empty (`--until-idle`). It parses, builds the manager and hands over to batchd.daemon; no logic of its own."""

from __future__ import annotations

import sys
from typing import Any

import click
import structlog

from batchd.backends import make_backend
from batchd.cli import EX_CONFIG, EX_TEMPFAIL, App, pass_app
from batchd.config import ConfigError, load
from batchd.errors import one_line
from batchd.store import Busy, DiskFull, SchemaMismatch, StoreError


@click.command()
@click.option("--once", is_flag=True, help="One recovery + flush + sync cycle, then exit (cron, systemd timer).")
@click.option("--until-idle", is_flag=True, help="Flush and sync until nothing is pending or running, then exit.")
@click.option("--poll", default="5s", show_default=True, metavar="DURATION",
              help="With --until-idle: the pause between cycles.")
@pass_app
def run(app: App, once: bool, until_idle: bool, poll: str) -> None:
    """Run the worker: a daemon (systemd Type=notify) by default; exit 0 on SIGTERM, 1 if a step failed."""
    from batchd import logs
    from batchd.config import parse_duration

    if once and until_idle:
        raise click.UsageError("--once and --until-idle cannot be combined")
    try:
        poll_s = parse_duration(poll)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--poll") from None
    try:
        level = load(app.config_path).daemon.log_level
    except ConfigError as e:
        # Under systemd this line lands in the journal: make it an event like every other (still one line).
        logs.configure("info", stream=sys.stdout)
        structlog.get_logger("batchd.cli").error("config.invalid", error=str(e), exit_status=EX_CONFIG)
        sys.exit(EX_CONFIG)
    capture = None
    if _on_fds_1_2() and (logs.stream_is_journal(sys.stdout) or not (sys.stdout.isatty() or sys.stderr.isatty())):
        # A service (JSON logs, nobody watching a terminal): what C libraries (PyTorch's cpuinfo, ...) write to
        # fd 1/2 becomes foreign.output events. (Not when called in-process with other streams: a test's runner.)
        from batchd.capture import OutputCapture

        capture = OutputCapture()
        logs.configure(level, stream=capture.start())
    else:
        logs.configure(level, stream=sys.stdout)
    try:
        sys.exit(_run(app, once, until_idle, poll_s))
    finally:
        if capture is not None:
            capture.stop()


def _on_fds_1_2() -> bool:
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError):
        return False


def _run(app: App, once: bool, until_idle: bool, poll_s: float) -> int:
    from batchd import daemon
    from batchd.systemd import Notifier

    app.may_create = True
    notifier = Notifier()
    manager = _start_manager(app, notifier, wait=not once and not until_idle)
    metrics = None
    mc = app.config.metrics
    if mc.textfile or mc.listen:
        from batchd.metrics import Metrics

        metrics = Metrics(mc.textfile)
    worker = daemon.Worker(manager, notifier=notifier, stop=app.stop, reload=app.reload, metrics=metrics)
    if once:
        return daemon.run_once(worker)
    if until_idle:
        from batchd.progress import TerminalProgress

        bar = TerminalProgress.for_stream(sys.stderr)
        if bar is not None:
            worker.on_activity = bar.update
        try:
            return daemon.run_until_idle(worker, poll_s, bar.cycle if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    return daemon.serve(worker, listen=mc.address, config_path=app.config_path)


def _start_manager(app: App, notifier: Any, *, wait: bool) -> Any:
    """The manager for `run`; a database or backend that cannot be used is one JSON event and an exit status.

    The daemon (``wait``) waits out a busy database or a full disk (startup.py). Under systemd these lines land in
    the journal (`journalctl -p err`); exit 78 (a config that does not fit the database or the model) is in the
    unit's RestartPreventExitStatus=, so a mistake does not restart-loop.
    """
    log = structlog.get_logger("batchd.cli")
    cfg = app.config
    try:
        if wait:
            app.wait_for_store(notifier)
        else:
            app.open_store()
        # Never READY=1 on a database this process cannot write: fail the start, saying which file is whose.
        app.store.probe_write()
    except SchemaMismatch as e:
        log.error("config.invalid", error=f"{cfg.source}: {e.key}: {e}", key=e.key, database=cfg.database.path,
                  exit_status=EX_CONFIG, **e.fields)
        sys.exit(EX_CONFIG)
    except StoreError as e:
        status = EX_TEMPFAIL if isinstance(e, (Busy, DiskFull)) else 1
        log.error("database.unusable", error=str(e), database=cfg.database.path, exit_status=status)
        sys.exit(status)
    try:
        app._backend = make_backend(cfg, app.store.instance_id)
    except ConfigError as e:
        log.error("config.invalid", error=str(e), key=e.key, exit_status=EX_CONFIG)
        sys.exit(EX_CONFIG)
    except Exception as e:  # noqa: BLE001 - any construction failure is reported on one line
        log.error("backend.unusable", backend=cfg.embedding.backend, error=one_line(e), exit_status=1)
        sys.exit(1)
    return app.manager
