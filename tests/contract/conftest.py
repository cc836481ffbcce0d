"""One rig per backend for the contract suite: the backend itself, a BatchManager on a real SQLite file, and a
small adapter that injects each fault the scenarios need.

- ``scripted``: the file-backed test backend (tests/fakes/membackend.py), faults through its knobs;
- ``vertex``: the real VertexBackend and Google clients against the fake JobService and the storage emulator,
  faults at the HTTP level where the fake has them;
- ``local``: the real LocalBackend and packaged model (loaded once per session), faults through :class:`Faults`;
- ``gemini-api``: the real GeminiApiBackend and google-genai client against the fake Gemini API
  (tests/fakes/fake_gemini_api.py), faults at the HTTP level like Vertex's.

:class:`Faults` wraps any backend and injects the faults a service cannot be asked for (a lookup that fails, a
result stream that breaks after some lines, and — for the local backend, which has no service — all of them).
A new backend joins the suite with a rig of its own: see ``RIGS`` and ``rig()`` below.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.backends import (
    Backend,
    BackendError,
    Cleanable,
    Item,
    JobInfo,
    JobState,
    Progress,
    RawResults,
    ResultLine,
    _noop,
    make_backend,
)
from batchd.manager import BatchManager
from batchd.store import Store
from tests.conftest import MEMBACKEND, Clock, merge
from tests.fakes.gemini_env import fake_gemini, gemini_config  # fixtures for the gemini-api rig
from tests.fakes.membackend import jobs_for_batch, set_knobs
from tests.fakes.vertex_env import fake_vertex, gcs, vertex_config  # fixtures for the vertex rig

# "-workers": the same backend with its output parsed by batchd's parse worker processes (RawResults, forced for
# every batch with daemon.parse_workers = 2) instead of its own results().
RIGS = ["scripted", "local", "vertex", "vertex-workers", "gemini-api", "gemini-api-workers"]


class Faults:
    """A Backend that delegates to ``inner`` and injects faults on request. Complete: every protocol call."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.lose_create = 0  # submits that create the job, then fail as if the answer was lost
        self.submit_errors = 0  # submits that fail transiently before creating anything
        self.lookup_errors = False  # find_job fails transiently
        self.hold = False  # jobs stay RUNNING (until cancelled: a held job still honours a cancel)
        self.end_as: JobState | None = None  # jobs end in this state instead of the backend's own
        self.fail_texts: set[str] = set()  # these texts get an error line
        self.break_after: int | None = None  # results() raises after yielding this many lines
        self._texts: dict[str, str] = {}  # key -> text, from the submitted items

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = _noop) -> str:
        if self.submit_errors:
            self.submit_errors -= 1
            raise BackendError("503 injected: service unavailable")
        items = list(items)
        self._texts.update((it.key, it.text) for it in items)
        name = self.inner.submit(batch_id, items, progress)
        if self.lose_create:
            self.lose_create -= 1
            raise BackendError("injected: connection reset after the job was created")
        return name

    def find_job(self, batch_id: int) -> str | None:
        if self.lookup_errors:
            raise BackendError("503 injected: lookup unavailable")
        return self.inner.find_job(batch_id)

    def status(self, job_name: str) -> JobInfo:
        if self.hold:
            # A held job still ends when it is cancelled (as a real one does, exporting what it completed).
            info = self.inner.status(job_name)
            return info if info.state is JobState.CANCELLED else JobInfo(job_name, JobState.RUNNING)
        if self.end_as is not None:
            return JobInfo(job_name, self.end_as, error=f"injected {self.end_as.value.lower()} job")
        return self.inner.status(job_name)

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        for n, line in enumerate(self.inner.results(job_name, progress), start=1):
            if self.break_after is not None and n > self.break_after:
                raise BackendError("injected: connection reset while reading results")
            if any(self._texts.get(k) in self.fail_texts for k in line.keys):
                line = ResultLine(line.keys, error="injected line failure")
            yield line

    def cancel(self, job_name: str) -> None:
        self.inner.cancel(job_name)

    def cleanup(self, batch_id: int, job_name: str) -> None:
        if isinstance(self.inner, Cleanable):
            self.inner.cleanup(batch_id, job_name)


class Rig:
    """What a scenario drives: ``store``, ``manager`` (on the :class:`Faults`-wrapped backend), ``clock`` and
    the fault switches. Subclasses route a switch to the backend's own fault injection where it has one."""

    name = "?"

    def __init__(self, config: Any, clock: Clock, stores: list[Store]):
        self.config, self.clock = config, clock
        self.store = Store.open(config)
        stores.append(self.store)
        self.inner = make_backend(config, self.store.instance_id)
        self.faults = RawFaults(self.inner) if isinstance(self.inner, RawResults) else Faults(self.inner)
        self.manager = BatchManager(self.store, self.faults, config, clock=clock)

    def app(self) -> Any:
        """The application's own connection (without sqlite-vec)."""
        return self.store.sqlite_module.connect(self.config.database.path)

    # fault switches ------------------------------------------------------------------------------------
    def lose_next_create(self) -> None:
        self.faults.lose_create += 1

    def fail_next_submit(self) -> None:
        self.faults.submit_errors += 1

    def fail_lookups(self, on: bool) -> None:
        self.faults.lookup_errors = on

    def hold_jobs(self, on: bool) -> None:
        self.faults.hold = on

    def end_jobs_as(self, state: str | None) -> None:
        self.faults.end_as = JobState(state) if state else None

    def fail_lines(self, texts: set[str]) -> None:
        self.faults.fail_texts = set(texts)

    def break_results_after(self, lines: int | None) -> None:
        self.faults.break_after = lines

    # observations ---------------------------------------------------------------------------------------
    def remote_jobs(self, batch_id: int) -> int:
        """How many jobs the service holds for the batch (two would mean paying twice)."""
        return 1 if self.inner.find_job(batch_id) else 0

    def expected_dimensions(self) -> int:
        return self.config.embedding.dimensions


class ScriptedRig(Rig):
    name = "scripted"

    def __init__(self, config: Any, clock: Clock, stores: list[Store]):
        super().__init__(config, clock, stores)
        self.dir = Path(config.database.path).parent / "testbackend"
        self.knobs: dict[str, Any] = {}

    def _set(self, **knobs: Any) -> None:
        self.knobs.update(knobs)
        set_knobs(self.dir, **{k: v for k, v in self.knobs.items() if v not in (None, False, 0, [])})

    def lose_next_create(self) -> None:
        self._set(lose_create=self.knobs.get("lose_create", 0) + 1)

    def fail_next_submit(self) -> None:
        self._set(submit_errors=self.knobs.get("submit_errors", 0) + 1)

    def hold_jobs(self, on: bool) -> None:
        self._set(never_finish=on)

    def end_jobs_as(self, state: str | None) -> None:
        self._set(final_state=state)

    def fail_lines(self, texts: set[str]) -> None:
        self._set(fail_texts=sorted(texts))

    def remote_jobs(self, batch_id: int) -> int:
        return len(jobs_for_batch(self.dir, batch_id))


class VertexRig(Rig):
    name = "vertex"

    def __init__(self, config: Any, clock: Clock, stores: list[Store], fake: Any):
        super().__init__(config, clock, stores)
        self.fake = fake
        fake.auto_finish = True  # a poll of an unfinished job runs it to its end (hold_jobs stops that)

    def lose_next_create(self) -> None:
        self.fake.lose_create += 1

    def fail_next_submit(self) -> None:
        self.fake.fail_next(503, op="create")  # ambiguous: the backend looks for the job, finds none

    def hold_jobs(self, on: bool) -> None:
        self.fake.auto_finish = not on

    def end_jobs_as(self, state: str | None) -> None:
        self.fake.final_state = state or "SUCCEEDED"

    def fail_lines(self, texts: set[str]) -> None:
        self.fake.fail = lambda text: "injected line failure" if text in texts else None

    def remote_jobs(self, batch_id: int) -> int:
        labels = {"batchd-batch": str(batch_id), "batchd-instance": self.store.instance_id}
        with self.fake.lock:
            return sum(1 for job in self.fake.jobs.values() if dict(job.labels) == labels)


class GeminiApiRig(VertexRig):
    """The same HTTP-level switches as Vertex's (the fake Gemini API has them under the same names); a batch is
    known to the service by its display name."""

    name = "gemini-api"

    def remote_jobs(self, batch_id: int) -> int:
        display = f"batchd-{self.store.instance_id}-{batch_id}"
        with self.fake.lock:  # deleted ones too: a batch cleaned up after use was still paid for
            return sum(1 for b in self.fake.batches.values() if b.display_name == display)


class RawFaults(Faults):
    """:class:`Faults` for a backend with RawResults: the manager reads the raw files; ``break_after`` breaks
    the byte stream once it has carried that many lines (line failures go to the service's fake instead)."""

    def result_files(self, job_name: str, progress: Progress = _noop) -> Iterator[tuple[str, Iterable[bytes]]]:
        assert not self.fail_texts, "route fail_lines to the backend's fake for a RawResults backend"
        assert isinstance(self.inner, RawResults)
        carried = 0

        def broken(blocks: Iterable[bytes]) -> Iterator[bytes]:
            nonlocal carried
            for block in blocks:
                carried += block.count(b"\n")
                if self.break_after is not None and carried > self.break_after:
                    raise BackendError("injected: connection reset while reading results")
                yield block

        for name, blocks in self.inner.result_files(job_name, progress):
            yield name, broken(blocks)

    def line_parser(self) -> tuple[str, dict[str, object]]:
        assert isinstance(self.inner, RawResults)
        return self.inner.line_parser()


LOCAL = {"embedding": {"backend": "local", "model": "all-MiniLM-L6-v2", "dimensions": 384},
         "local": {"slice_size": 4, "batch_size": 8}}


@pytest.fixture(params=RIGS)
def rig(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Rig]:
    """The same scenario on every backend."""
    base = {"database": {"path": str(tmp_path / "app.db")},
            "queue": {"min_batch_size": 1, "max_batch_size": 1000, "max_attempts": 3}}
    stores: list[Store] = []
    from batchd.config import from_dict

    source = str(tmp_path / "batchd.toml")
    if request.param == "scripted":
        cfg = from_dict(merge(base, {"embedding": {"backend": MEMBACKEND, "model": "test-model", "dimensions": 16}}),
                        source=source)
        r: Rig = ScriptedRig(cfg, clock, stores)
    elif request.param == "local":
        pytest.importorskip("sentence_transformers")
        r = Rig(from_dict(merge(base, LOCAL), source=source), clock, stores)
        r.name = "local"
    elif request.param.startswith("gemini-api"):
        fake = request.getfixturevalue("fake_gemini")
        workers = {"daemon": {"parse_workers": 2}} if request.param.endswith("-workers") else {}
        r = GeminiApiRig(gemini_config(tmp_path, fake, **base, **workers), clock, stores, fake)
    else:
        fake = request.getfixturevalue("fake_vertex")
        workers = {"daemon": {"parse_workers": 2}} if request.param.endswith("-workers") else {}
        r = VertexRig(vertex_config(tmp_path, fake, **base, **workers), clock, stores, fake)
    r.name = request.param
    yield r
    for s in stores:
        s.close()
