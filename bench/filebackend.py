"""A complete Backend whose jobs are folders of finished output files in the classic Vertex format.

Used by the benchmark to drive ``BatchManager.sync_status()`` over local files, so the sync figure measures
batchd's own apply path (parse, match, write) without any network in the way. A job name is a folder path;
every ``*.jsonl`` in it is streamed line by line and parsed by :class:`batchd.backends.vertex_lines.LineFormat`,
the parser VertexBackend uses — or, as VertexBackend does for big jobs, handed over as raw blocks
(``RawResults``) to batchd's parse workers.
Load it through the plugin hook: ``[embedding] backend = "bench.filebackend:FilesBackend"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from batchd.backends import Item, JobInfo, JobState, Progress, ResultLine
from batchd.backends.vertex_lines import LineFormat

PROGRESS_LINES = 500
RAW_BLOCK = 256 * 1024


def _noop() -> None:
    return None


class FilesBackend:
    def __init__(self, config: Any, instance_id: str):
        emb = config.embedding
        # The production parser, so the sync figure measures what VertexBackend does with each line.
        self.lines = LineFormat(emb.model, emb.task_type, emb.dimensions)

    def submit(self, batch_id: int, items: Iterable[Item], progress: Progress = _noop) -> str:
        raise NotImplementedError("the benchmark's file backend only serves finished jobs")

    def find_job(self, batch_id: int) -> str | None:
        return None

    def status(self, job_name: str) -> JobInfo:
        return JobInfo(job_name, JobState.SUCCEEDED, output=job_name)

    def cancel(self, job_name: str) -> None:
        return None

    def results(self, job_name: str, progress: Progress = _noop) -> Iterator[ResultLine]:
        n = 0
        for path in sorted(Path(job_name).glob("*.jsonl")):
            with path.open("rb", buffering=1 << 20) as f:
                for raw in f:
                    n += 1
                    if n % PROGRESS_LINES == 0:
                        progress()
                    if not raw.strip():
                        continue
                    line = self.lines.parse(raw)
                    if line is not None:
                        yield line
        progress()

    def result_files(self, job_name: str, progress: Progress = _noop) -> Iterator[tuple[str, Iterator[bytes]]]:
        """RawResults: the same files as raw 256 KiB blocks, parsed by batchd's parse workers."""
        for path in sorted(Path(job_name).glob("*.jsonl")):
            yield path.name, _blocks(path, progress)

    def line_parser(self) -> tuple[str, dict[str, object]]:
        return "batchd.backends.vertex_lines:LineFormat", {
            "model": self.lines.model, "task_type": self.lines.task_type, "dimensions": self.lines.dimensions}


def _blocks(path: Path, progress: Progress) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as f:
        while block := f.read(RAW_BLOCK):
            progress()
            yield block
