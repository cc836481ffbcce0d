"""`batchd check --live`: one tiny real job through the same code path as real batches, verified line by line.

Three short fixed texts (never the user's chunks; nothing is written to the chunks table) are submitted as
batch ``LIVE_BATCH_ID`` with the configured model, task type and dimensions; the job is polled until it ends
(bounded by a timeout; Ctrl-C cancels it); then every fact batchd relies on is checked and printed, one line
each, as ``ok`` / ``warn`` / ``FAIL`` with what was expected and what came. The staged files are deleted
afterwards unless ``keep``.

A backend takes part through the ordinary Backend protocol (submit, status, results, cancel), plus, when it
has them: ``discard(batch_id)`` (delete whatever the batch staged, whatever the cleanup setting),
``output_files(job_name)`` (the result files it reads) and ``live_notes()`` (what is confirmed about the
service and from where, and what the first real run should look at).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from batchd.backends import Backend, Item, JobInfo, ResultLine, content_hash
from batchd.config import format_duration
from batchd.errors import one_line

LIVE_BATCH_ID = 0  # real batch ids start at 1: the live job's labels and staging path never meet a real one
LIVE_TEXTS = (
    "batchd live check: a short English sentence about embedding text in batches.",
    "Ein kurzer deutscher Satz über Vektoren und Suche.",
    "Un texte court en français pour vérifier le format de sortie.",
)
UNIT_TOLERANCE = 1e-3


@dataclass
class Line:
    mark: str  # "ok", "warn", "FAIL", "note"
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.mark:<4}  {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass
class LiveResult:
    lines: list[Line] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(ln.mark != "FAIL" for ln in self.lines)


def run_live_check(backend: Backend, model: str, task_type: str, dimensions: int, *, timeout: float,
                   keep: bool = False, poll: float = 10.0, echo: Callable[[Line], None] = lambda line: None,
                   waiting: Callable[[str, float], None] = lambda state, elapsed: None,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> LiveResult:
    """Submit, wait, verify, clean up. ``echo`` gets each line as it is decided; ``waiting`` the job's state
    and the seconds waited, once per poll. KeyboardInterrupt (Ctrl-C) at any point cancels the job (found by
    its labels if its creation was under way), deletes its files and ends the check (``interrupted``)."""
    res = LiveResult()

    def say(mark: str, name: str, detail: str = "") -> None:
        line = Line(mark, name, detail)
        res.lines.append(line)
        echo(line)

    items = [Item(content_hash(t, model, task_type, dimensions), t) for t in LIVE_TEXTS]
    texts = {it.key: it.text for it in items}
    _discard(backend)  # an earlier --keep run's input would otherwise be reused as is
    job: str | None = None
    try:
        try:
            job = backend.submit(LIVE_BATCH_ID, items)
        except Exception as e:  # noqa: BLE001 - reported as a line, like every surprise
            say("FAIL", "input accepted", f"expected the service to accept a {len(items)}-line job; it answered: "
                f"{one_line(e)}")
            _discard(backend)
            return res
        say("ok", "input accepted", f"{len(items)} lines, {model}, {task_type}, {dimensions} dimensions: job {job}")
        try:
            info = _wait(backend, job, timeout, poll, waiting, sleep, clock)
        except Exception as e:  # noqa: BLE001
            say("FAIL", "job finished", f"reading the job's state failed: {one_line(e)} (cancelled)")
            _cancel(backend, job)
            _discard(backend)
            return res
        if info is not None:
            _verify(backend, job, info, texts, dimensions, say)
    except KeyboardInterrupt:
        res.interrupted = True
        if job is None:
            try:
                job = backend.find_job(LIVE_BATCH_ID)
            except Exception:  # noqa: BLE001 - best effort
                job = None
        if job is not None:
            _cancel(backend, job)
        removed = _discard(backend)
        say("FAIL", "interrupted", (f"job {job} cancelled" if job else "no job was created")
            + (f", {removed} staged objects deleted" if removed else ""))
        return res
    if info is None:
        _cancel(backend, job)
        if not keep:
            _discard(backend)
        say("FAIL", "job finished", f"expected the job to end within {format_duration(timeout)}; it did not "
            "(cancelled)")
        return res
    if keep:
        say("note", "files kept", f"batch {LIVE_BATCH_ID}'s staged input and output were left for inspection")
    else:
        removed = _discard(backend)
        say("ok", "cleaned up", f"{removed} staged objects deleted")
    notes = getattr(backend, "live_notes", None)
    for note in notes() if callable(notes) else []:
        say("note", "to look at", note)
    return res


def _verify(backend: Backend, job: str, info: JobInfo, texts: dict[str, str], dimensions: int,
            say: Callable[[str, str, str], None]) -> None:
    n = len(texts)
    if not info.state.has_results:
        say("FAIL", "job finished", f"expected SUCCEEDED; the job ended {info.state.value}"
            + (f": {info.error}" if info.error else ""))
        if not info.output:
            return
    else:
        say("ok", "job finished", info.state.value)
    lister = getattr(backend, "output_files", None)
    if callable(lister):
        try:
            files = lister(job)
        except Exception as e:  # noqa: BLE001
            say("FAIL", "output files", f"listing the job's output failed: {one_line(e)}")
            return
        if not files:
            say("FAIL", "output files", f"expected at least one *.jsonl result file in {info.output}; found none")
            return
        say("ok", "output files", ", ".join(f.rsplit("/", 1)[-1] for f in files) + f" in {info.output}")
    try:
        lines = list(backend.results(job))
    except Exception as e:  # noqa: BLE001
        say("FAIL", "each line parsed", f"reading the job's output failed: {one_line(e)}")
        return
    answered: dict[str, ResultLine] = {}
    problems = []
    for line in lines:
        if not line.keys:
            problems.append(f"an output line tied to no text ({line.error})")
            continue
        for k in line.keys:
            if k not in texts:
                problems.append(f"a line for a text that was not sent (key {k[:12]}...)")
            elif line.error:
                problems.append(f"text {list(texts).index(k) + 1} failed: {line.error}")
            else:
                answered.setdefault(k, line)
    missing = [list(texts).index(k) + 1 for k in texts if k not in answered and not any(
        k in ln.keys for ln in lines)]
    if missing:
        problems.append(f"no line at all for text(s) {', '.join(map(str, missing))}")
    if problems or len(answered) != n:
        say("FAIL", "each line parsed", f"expected {n} lines, each with a vector; got {len(lines)} lines: "
            + "; ".join(problems))
    else:
        say("ok", "each line parsed", f"{len(lines)} lines, {n} texts answered")
    if not answered:
        return
    sizes = sorted({ln.answered_dims or 0 for ln in answered.values()})
    if any(ln.cut for ln in answered.values()):
        say("ok", "vector length", f"answered {', '.join(map(str, sizes))} values for {dimensions} asked: cut to "
            f"the first {dimensions} and renormalised (Matryoshka prefix)")
    else:
        say("ok", "vector length", f"{dimensions} values, as asked")
    norms = [_norm(ln.vector) for ln in answered.values() if ln.vector is not None]
    if all(abs(x - 1.0) <= UNIT_TOLERANCE for x in norms):
        say("ok", "unit length", "every stored vector has norm 1")
    else:
        say("warn", "unit length", "expected unit vectors; stored norms " + ", ".join(f"{x:.4f}" for x in norms)
            + " (harmless for cosine search; a query and its documents still compare alike)")
    tokens = [ln.token_count for ln in answered.values()]
    if all(t is not None for t in tokens):
        say("ok", "token counts", f"{', '.join(map(str, tokens))} (total {sum(t or 0 for t in tokens)})")
    else:
        say("FAIL", "token counts", f"expected a token count on every line (statistics.token_count or "
            f"response.tokenCount); {sum(t is None for t in tokens)} of {len(tokens)} had none")
    truncated = sum(ln.truncated for ln in answered.values())
    if truncated:
        say("FAIL", "not truncated", f"expected {n} short texts to fit the model's input; {truncated} truncated")
    chars = sum(len(texts[k]) for k in answered)
    counts = f"succeeded={info.succeeded}, failed={info.failed}" if info.succeeded is not None else \
        "the service reports no row counts"
    billed = f"; {sum(t or 0 for t in tokens)} tokens, {chars} characters answered"
    if info.succeeded is not None and info.succeeded != n:
        say("FAIL", "job counts", f"expected succeeded={n}; {counts}{billed}")
    else:
        say("ok", "job counts", counts + billed)


def _wait(backend: Backend, job: str, timeout: float, poll: float, waiting: Callable[[str, float], None],
          sleep: Callable[[float], None], clock: Callable[[], float]) -> JobInfo | None:
    started = clock()
    while True:
        info = backend.status(job)
        elapsed = clock() - started
        waiting(info.state.value, elapsed)
        if info.state.terminal:
            return info
        if elapsed >= timeout:
            return None
        sleep(min(poll, max(0.0, timeout - elapsed)) or 0.01)


def _cancel(backend: Backend, job: str) -> None:
    try:
        backend.cancel(job)
    except Exception:  # noqa: BLE001 - best effort: the check already failed
        pass


def _discard(backend: Backend) -> int:
    discard = getattr(backend, "discard", None)
    if not callable(discard):
        return 0
    try:
        return int(discard(LIVE_BATCH_ID) or 0)
    except Exception:  # noqa: BLE001 - best effort
        return 0


def _norm(blob: bytes | None) -> float:
    return math.sqrt(sum(x * x for x in array("f", blob or b"")))


__all__ = ["LIVE_BATCH_ID", "LIVE_TEXTS", "Line", "LiveResult", "run_live_check"]
