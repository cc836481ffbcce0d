"""A complete Backend whose jobs are folders of finished output files in the classic Vertex format.

Used by the benchmark to drive ``BatchManager.sync_status()`` over local files, so the sync figure measures
batchd's own apply path (parse, match, write) without any network in the way. A job name is a folder path;
every ``*.jsonl`` in it is streamed line by line, parsed with orjson into float32 blobs, as a real backend does.
Load it through the plugin hook: ``[embedding] backend = "bench.filebackend:FilesBackend"``.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from batchd.backends import Item, JobInfo, JobState, Progress, ResultLine, content_hash

PROGRESS_LINES = 500


def _noop() -> None:
    return None


class FilesBackend:
    def __init__(self, config: Any, instance_id: str):
        emb = config.embedding
        self.model, self.task_type, self.dimensions = emb.model, emb.task_type, emb.dimensions

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
                    line = self.parse_line(raw)
                    if line is not None:
                        yield line
        progress()

    def parse_line(self, raw: bytes) -> ResultLine | None:
        """The classic line -> ResultLine keyed by the content hash of the echoed text."""
        try:
            obj = orjson.loads(raw)
            inst = obj["instance"]
            key = content_hash(inst["content"], self.model, inst.get("task_type") or self.task_type,
                               self.dimensions)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if obj.get("status"):
            return ResultLine((key,), error=str(obj["status"])[:500])
        try:
            emb = obj["predictions"][0]["embeddings"]
            vec = array("f", emb["values"])
        except (KeyError, IndexError, TypeError):
            return ResultLine((key,), error="no embedding in the result line")
        if sys.byteorder != "little":  # pragma: no cover
            vec.byteswap()
        tokens = (emb.get("statistics") or {}).get("token_count")
        return ResultLine((key,), vector=vec.tobytes(), token_count=tokens)
