"""A complete Backend implementation for tests: it "embeds" by hashing text, keeping its jobs as files.

It is a real backend, loaded through the real plugin hook
(``[embedding] backend = "tests.fakes.membackend:ScriptedBackend"``, with the repository on PYTHONPATH), so it
works inside a daemon subprocess too. State lives in a folder: ``$BATCHD_TEST_BACKEND_DIR``, else
``<database folder>/testbackend``. Jobs are JSON files there; nothing is kept only in memory, so a restarted
process sees the same jobs.

Knobs live in ``knobs.json`` in that folder and are re-read on every call, so a test can change them while a
daemon runs (use :func:`set_knobs`). All optional:

- ``shuffle`` (bool): answer lines in a random order.
- ``drop_every`` (int N): leave every Nth item (in submitted order) out of the output.
- ``drop_texts`` (list[str]): items whose text is one of these are left out of the output.
- ``fail_every`` (int N): answer every Nth item with an error line ("status: simulated line failure").
- ``fail_texts`` (list[str]): items whose text contains one of these get an error line.
- ``final_state`` (str): the state jobs end in (default SUCCEEDED): FAILED, CANCELLED, EXPIRED,
  PARTIALLY_SUCCEEDED.
- ``polls_to_finish`` (int): status() calls a job answers RUNNING before it ends (default 0).
- ``never_finish`` (bool): jobs stay RUNNING.
- ``submit_errors`` (int N): the next N submits raise a transient error without creating anything.
- ``submit_permanent`` (str): every submit raises PermanentError with this message.
- ``lose_create`` (int N): the next N submits create the job, then raise (the lost-response case).
- ``status_errors`` (int N): the next N status() calls raise a transient error.
- ``cancel_errors`` (int N): the next N cancel() calls raise a transient error (the job keeps running).
- ``block`` (str): "submit" | "status" | "results" — that call blocks forever (a wedged worker).
- ``hang_submits`` (int N): the next N submits hang until the process dies (a worker the watchdog must
  kill; unlike ``block``, the restarted process is not wedged again).
- ``result_delay`` (float seconds): sleep this long before each result line (a slow sync). results()
  calls ``progress()`` every 50 lines, like a real backend per downloaded block.

- ``results_error`` (str): results() raises a transient BackendError with this message (a batch that keeps
  failing the same way, like PyTorch refusing to run under MemoryDenyWriteExecute=yes).
- ``foreign_output`` (str): status() writes this line straight to file descriptors 1 and 2, as a C library
  would (PyTorch's ``Error in cpuinfo: ...``), bypassing Python's sys.stdout/sys.stderr.

``RawScriptedBackend`` is the same backend with RawResults: its output is JSON lines (``ScriptedLines``), parsed by
batchd's parse worker processes. Its extra knobs: ``parser_die_at`` (int N: the worker parsing the Nth line of a
chunk exits with status 3), ``parser_raise_at`` (int N: the parser raises ValueError there), ``parser_missing``
(bool: line_parser() names a module that does not exist, so no worker can start).

Counters (``submits``, ``creates``, ``cancels``, ``lines_sent``) are kept in ``counters.json`` for assertions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchd.backends import (
    BackendError,
    CheckResult,
    Item,
    JobInfo,
    JobState,
    PermanentError,
    Progress,
    ResultLine,
)
from batchd.config import SettingError
from batchd.faults import crash_point

_lock = threading.Lock()


def fake_vector(text: str, dimensions: int) -> bytes:
    """The deterministic vector this backend returns for a text (float32 little-endian)."""
    out = bytearray()
    counter = 0
    while len(out) < 4 * dimensions:
        digest = hashlib.sha256(f"{counter}\x00{text}".encode()).digest()
        for i in range(0, len(digest), 2):
            value = (int.from_bytes(digest[i:i + 2], "little") / 65535.0) * 2 - 1
            out += struct.pack("<f", value)
        counter += 1
    return bytes(out[: 4 * dimensions])


def backend_dir(config: Any) -> Path:
    env = os.environ.get("BATCHD_TEST_BACKEND_DIR")
    return Path(env) if env else config.state_dir / "testbackend"


def set_knobs(folder: Path, **knobs: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "knobs.json", knobs)


def read_counters(folder: Path) -> dict[str, int]:
    return _read_json(folder / "counters.json", {})


def jobs_for_batch(folder: Path, batch_id: int) -> list[dict[str, Any]]:
    return [_read_json(p, {}) for p in sorted(folder.glob(f"job-{batch_id}-*.json"))]


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass(frozen=True)
class ScriptedSettings:
    """``[plugin.scripted]``: a plugin backend's own section, built and validated by batchd's config rules."""

    folder: str = ""  # where jobs, knobs and counters live (default: $BATCHD_TEST_BACKEND_DIR, else next to the db)

    def validate(self) -> None:
        if self.folder and not Path(self.folder).is_absolute():
            raise SettingError("folder", f"{self.folder!r} is not an absolute path")


class ScriptedBackend:
    """The scripted test backend (formerly MemoryBackend: it never kept its jobs in memory, but in files)."""

    settings_class = ScriptedSettings
    settings_section = "scripted"

    def __init__(self, config: Any, instance_id: str, settings: ScriptedSettings | None = None):
        self.dimensions = config.embedding.dimensions
        self.instance_id = instance_id
        self.dir = Path(settings.folder) if settings and settings.folder else backend_dir(config)
        self.dir.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- knobs and counters

    def _knobs(self) -> dict[str, Any]:
        return _read_json(self.dir / "knobs.json", {})

    def _take(self, knob: str) -> bool:
        """Consume one unit of a counted knob; True if it was still positive."""
        with _lock:
            knobs = self._knobs()
            n = int(knobs.get(knob, 0) or 0)
            if n <= 0:
                return False
            knobs[knob] = n - 1
            _write_json(self.dir / "knobs.json", knobs)
            return True

    def _count(self, name: str, by: int = 1) -> None:
        with _lock:
            c = read_counters(self.dir)
            c[name] = c.get(name, 0) + by
            _write_json(self.dir / "counters.json", c)

    def _block(self, call: str) -> None:
        while self._knobs().get("block") == call:
            time.sleep(0.2)

    # -------------------------------------------------------------- the protocol

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = lambda: None) -> str:
        self._block("submit")
        if self._take("hang_submits"):
            while True:  # wedged until the process is killed (a restarted process is not affected)
                time.sleep(1)
        self._count("submits")
        knobs = self._knobs()
        if knobs.get("submit_permanent"):
            raise PermanentError(str(knobs["submit_permanent"]))
        if self._take("submit_errors"):
            raise BackendError("503 simulated: service unavailable")
        rows = [[it.key, it.text] for it in items]
        progress()
        # "Upload": stage the input, kept if an earlier attempt left it (like Vertex's ifGenerationMatch=0).
        staged = self.dir / f"input-{self.instance_id}-{batch_id}.json"
        if not staged.exists():
            _write_json(staged, rows)
        crash_point("submit.uploaded")
        n = len(list(self.dir.glob(f"job-{batch_id}-*.json")))
        name = f"memjobs/{self.instance_id}/{batch_id}/{n}"
        _write_json(self._path(name), {"name": name, "batch_id": batch_id, "instance": self.instance_id,
                                       "items": rows, "polls": 0, "cancelled": False, "created": time.time()})
        self._count("creates")
        self._count("lines_sent", len(rows))
        if self._take("lose_create"):
            raise BackendError("simulated: connection reset after the job was created")
        return name

    def find_job(self, batch_id: int) -> str | None:
        for job in jobs_for_batch(self.dir, batch_id):
            if job.get("instance") == self.instance_id:
                return str(job["name"])
        return None

    def status(self, job_name: str) -> JobInfo:
        self._block("status")
        if self._take("status_errors"):
            raise BackendError("429 simulated: quota exceeded")
        job = self._load(job_name)
        knobs = self._knobs()
        if knobs.get("foreign_output"):
            raw = str(knobs["foreign_output"]).encode() + b"\n"
            os.write(1, b"stdout: " + raw)
            os.write(2, raw)
        if job["cancelled"]:
            return JobInfo(job_name, JobState.CANCELLED, error="cancelled by request")
        job["polls"] += 1
        _write_json(self._path(job_name), job)
        if knobs.get("never_finish") or job["polls"] <= int(knobs.get("polls_to_finish", 0)):
            return JobInfo(job_name, JobState.RUNNING)
        state = JobState(knobs.get("final_state", "SUCCEEDED"))
        error = None if state.has_results else f"simulated {state.value.lower()} job"
        # Like Vertex's completionStats: the service counts the rows it answered, dropped lines included.
        answers = self._answers(job, knobs, dropped=True) if state.has_results else []
        failed = sum(1 for a in answers if a.error)
        # A failed job here exported nothing (tests/fakes/fake_vertex.py has jobs that fail after exporting).
        return JobInfo(job_name, state, error=error, output=str(self._path(job_name)) if state.has_results else None,
                       succeeded=len(answers) - failed if state.has_results else None,
                       failed=failed if state.has_results else None)

    def _answers(self, job: dict[str, Any], knobs: dict[str, Any], dropped: bool = False) -> list[ResultLine]:
        fail_texts = knobs.get("fail_texts") or []
        drop_texts = set(knobs.get("drop_texts") or [])
        lines: list[ResultLine] = []
        for n, (key, text) in enumerate(job["items"], start=1):
            if not dropped and ((knobs.get("drop_every") and n % int(knobs["drop_every"]) == 0) or text in drop_texts):
                continue
            if (knobs.get("fail_every") and n % int(knobs["fail_every"]) == 0) or any(s in text for s in fail_texts):
                lines.append(ResultLine((key,), error="status: simulated line failure"))
            else:
                lines.append(ResultLine((key,), vector=fake_vector(text, self.dimensions), token_count=len(text.split())))
        return lines

    def _output(self, job_name: str) -> tuple[list[ResultLine], float]:
        """The job's answers as the knobs shape them, and the delay before each line."""
        self._block("results")
        job = self._load(job_name)
        knobs = self._knobs()
        if knobs.get("results_error"):
            raise BackendError(str(knobs["results_error"]))
        lines = self._answers(job, knobs)
        if knobs.get("shuffle"):
            random.Random(job_name).shuffle(lines)
        return lines, float(knobs.get("result_delay", 0) or 0)

    def results(self, job_name: str, progress: Progress = lambda: None) -> Iterator[ResultLine]:
        lines, delay = self._output(job_name)
        for n, line in enumerate(lines, start=1):
            if delay:
                time.sleep(delay)
            yield line
            if n % 50 == 0:
                progress()  # like a real download, report progress per block (may raise Stopped)

    def cancel(self, job_name: str) -> None:
        if self._take("cancel_errors"):
            raise BackendError("503 simulated: cancel failed")
        self._count("cancels")
        try:
            job = self._load(job_name)
        except BackendError:
            return
        job["cancelled"] = True
        _write_json(self._path(job_name), job)

    def check(self) -> list[CheckResult]:
        return [CheckResult("memory backend folder", self.dir.is_dir(), str(self.dir))]

    def embed_query(self, text: str) -> bytes:
        return fake_vector(text, self.dimensions)

    # -------------------------------------------------------------- files

    def _path(self, job_name: str) -> Path:
        _, _, batch_id, n = job_name.split("/")
        return self.dir / f"job-{batch_id}-{n}.json"

    def _load(self, job_name: str) -> dict[str, Any]:
        try:
            return json.loads(self._path(job_name).read_text())
        except (FileNotFoundError, ValueError):
            raise PermanentError(f"no such job {job_name}") from None


MemoryBackend = ScriptedBackend  # the old name: configs and tests written for it keep loading


class RawScriptedBackend(ScriptedBackend):
    """ScriptedBackend plus RawResults: the same answers as JSON lines, ``result_delay`` per line."""

    def result_files(self, job_name: str, progress: Progress = lambda: None) -> Iterator[tuple[str, Iterator[bytes]]]:
        lines, delay = self._output(job_name)
        knobs = self._knobs()

        def blocks() -> Iterator[bytes]:
            for n, line in enumerate(lines, start=1):
                if delay:
                    time.sleep(delay)
                vec = list(struct.unpack(f"<{len(line.vector) // 4}f", line.vector)) if line.vector else None
                yield json.dumps({"key": line.keys[0], "values": vec, "error": line.error,
                                  "tokens": line.token_count}).encode() + b"\n"
                if n % 50 == 0:
                    progress()

        yield "results.jsonl", blocks()
        if knobs.get("malformed_line"):  # True: one garbage line; a number: that many
            yield "errors.jsonl", iter([b"not json at all\n" * int(knobs["malformed_line"])])

    def line_parser(self) -> tuple[str, dict[str, object]]:
        knobs = self._knobs()
        if knobs.get("parser_missing"):
            return "tests.fakes.no_such_module:ScriptedLines", {}
        return "tests.fakes.membackend:ScriptedLines", {
            "dimensions": self.dimensions, "die_at": knobs.get("parser_die_at"), "raise_at": knobs.get("parser_raise_at")}


class ScriptedLines:
    """The parser of RawScriptedBackend's lines, run inside batchd's parse workers."""

    def __init__(self, dimensions: int, die_at: int | None = None, raise_at: int | None = None, sleep: float = 0.0):
        self.dimensions, self.die_at, self.raise_at, self.sleep = dimensions, die_at, raise_at, sleep
        self.n = 0

    def parse(self, raw: bytes) -> ResultLine | None:
        from batchd.vectors import fit_vector

        self.n += 1
        time.sleep(self.sleep)
        if self.die_at and self.n == self.die_at:
            os._exit(3)
        if self.raise_at and self.n == self.raise_at:
            raise ValueError("scripted parser failure")
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        if obj.get("error"):
            return ResultLine((obj["key"],), error=obj["error"])
        return ResultLine((obj["key"],), vector=fit_vector(obj["values"], self.dimensions)[0],
                          token_count=obj.get("tokens"))

