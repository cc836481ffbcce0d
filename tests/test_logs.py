"""batchd.logs in a real child process (logging setup is process-wide, so never configured in pytest itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import on_a_terminal

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    import structlog
    from batchd import logs

    logs.configure(sys.argv[1])
    log = structlog.get_logger("batchd.test")
    log.debug("test.debug", n=1)
    log.info("batch.submitted", batch_id=7, google_job_id="projects/p/locations/l/batchPredictionJobs/1",
             chunks=3, duration_ms=12)
    logging.getLogger("urllib3.connectionpool").warning("Retrying (%s) after %s", "Retry(total=2)", "reset")
    logging.getLogger("apscheduler.scheduler").info("Added job flush")  # quiet below debug
    logging.getLogger("apscheduler.scheduler").warning(
        'Execution of job "sync" skipped: maximum number of running instances reached (1)')  # expected: debug
    warnings.warn("this API is deprecated", UserWarning)

    def apply(texts):
        secret_text = texts[0]  # a local holding chunk text must never reach the log
        raise ValueError("slice failed")

    try:
        apply(["the quick secret chunk text"])
    except ValueError:
        log.error("job.failed", batch_id=7, exc_info=True)
    raise RuntimeError("unhandled")
""")


def run(tmp_path: Path, level: str = "info", journal: str | None = "match") -> tuple[list[str], str, int]:
    script = tmp_path / "emit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "stdout.log"
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    with open(out, "w") as f:
        if journal == "match":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "other":
            env["JOURNAL_STREAM"] = "1:2"
        r = subprocess.run([sys.executable, str(script), level], stdout=f, stderr=subprocess.PIPE, env=env,
                           timeout=60)
    return out.read_text().splitlines(), r.stderr.decode(), r.returncode


def parse(line: str) -> tuple[str | None, dict]:
    if line.startswith("<") and line[2] == ">":
        return line[1], json.loads(line[3:])
    return None, json.loads(line)


def test_json_lines_with_journal_priority(tmp_path):
    lines, stderr, rc = run(tmp_path)
    assert rc == 1
    parsed = [parse(x) for x in lines]
    by_event = {e["event"]: (prio, e) for prio, e in parsed}
    assert [e["event"] for _, e in parsed] == ["batch.submitted", "library.log", "warning.python", "job.failed",
                                               "process.crashed"]

    prio, sub = by_event["batch.submitted"]
    assert prio == "6"
    assert list(sub)[:4] == ["timestamp", "level", "event", "logger"]
    assert sub["timestamp"].endswith("Z") and "T" in sub["timestamp"]
    assert sub["logger"] == "batchd.test" and sub["batch_id"] == 7 and sub["duration_ms"] == 12

    prio, lib = by_event["library.log"]  # stdlib logging from a dependency, same pipeline
    assert prio == "4" and lib["logger"] == "urllib3.connectionpool"
    assert lib["message"] == "Retrying (Retry(total=2)) after reset"
    assert by_event["warning.python"][0] == "4" and "this API is deprecated" in by_event["warning.python"][1]["message"]

    prio, failed = by_event["job.failed"]  # the traceback is a structured field, without local variables
    assert prio == "3"
    exc = failed["exception"][0]
    assert exc["exc_type"] == "ValueError" and exc["exc_value"] == "slice failed"
    assert [f["name"] for f in exc["frames"]][-1] == "apply"
    assert "secret" not in "\n".join(lines)

    prio, crash = by_event["process.crashed"]  # an uncaught exception is an event too
    assert prio in ("2", "3") and crash["exception"][0]["exc_type"] == "RuntimeError"
    assert "Traceback" not in stderr


def test_no_prefix_when_stdout_is_not_the_journal(tmp_path):
    # $JOURNAL_STREAM inherited by a process whose stdout goes elsewhere (a file): plain JSON.
    for mode in (None, "other"):
        lines, _, _ = run(tmp_path, journal=mode)
        assert lines and all(line.startswith("{") for line in lines), lines


def test_level_filters(tmp_path):
    debug, _, _ = run(tmp_path, "debug")
    events = [parse(x)[1]["event"] for x in debug]
    assert "test.debug" in events
    assert any(parse(x)[1].get("message") == "Added job flush" for x in debug)
    skipped = [parse(x) for x in debug if "maximum number of running instances" in x]
    assert [(prio, e["level"]) for prio, e in skipped] == [("7", "debug")]
    assert parse(debug[0])[0] == "7"
    warning, _, _ = run(tmp_path, "warning")
    assert [parse(x)[1]["event"] for x in warning] == ["library.log", "warning.python", "job.failed",
                                                       "process.crashed"]


def test_terminal_gets_readable_lines(tmp_path):
    script = tmp_path / "emit.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    _, text = on_a_terminal([sys.executable, str(script), "info"], env, timeout=30)
    assert "batch.submitted" in text and "\x1b[" in text  # colored
    assert not text.lstrip().startswith("{")
