"""Seeded benchmark data: chunk texts, enqueue JSONL, and finished-job output files in the classic Vertex format.

Everything is a pure function of (seed, size), so two runs measure the same bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchd.config import Config, from_dict

DIMENSIONS = 768
MODEL = "text-embedding-005"
TASK = "RETRIEVAL_DOCUMENT"
FILES_PER_JOB = 3
_WORDS = ["vector", "index", "batch", "embedding", "sqlite", "chunk", "model", "query", "retrieval", "document", "table", "column", "job", "shard", "cache", "latency", "token", "window", "corpus", "answer", "search", "store", "daemon", "queue", "result", "status", "file", "cloud", "storage", "region", "project", "label", "bucket", "prefix", "output", "input", "write", "read", "lock", "page", "journal"]


def _corpus(seed: int, size: int = 1 << 20) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(_WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words)


def texts(seed: int, n: int, *, mean_len: int = 400) -> Iterator[str]:
    """``n`` distinct texts of ``mean_len/2 .. 3*mean_len/2`` characters (a unique prefix keeps them distinct)."""
    corpus = _corpus(seed)
    rng = random.Random(seed + 1)
    span = len(corpus) - 2 * mean_len
    for i in range(n):
        start = rng.randrange(span)
        length = rng.randrange(mean_len // 2, mean_len * 3 // 2)
        yield f"chunk {seed}-{i}: " + corpus[start:start + length]


def write_enqueue_jsonl(path: Path, seed: int, n: int) -> int:
    """{"text": ...} per line (no ids: the bulk-import case). Returns bytes written."""
    with path.open("wb") as f:
        for text in texts(seed, n):
            f.write(orjson.dumps({"text": text}))
            f.write(b"\n")
    return path.stat().st_size


def write_classic_output(folder: Path, seed: int, n: int, files: int = FILES_PER_JOB) -> list[Path]:
    """A finished classic job's output for ``texts(seed, n)``: shuffled, split over ``files`` files.

    Values are float64 as Vertex sends them (~19 characters each: ~15 KB per 768-dim line).
    """
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(n))
    random.Random(seed + 2).shuffle(order)
    all_texts = list(texts(seed, n))
    rng = np.random.default_rng(seed + 3)
    paths = [folder / f"predictions_{k + 1:04d}.jsonl" for k in range(files)]
    handles = [p.open("wb") for p in paths]
    try:
        for pos, idx in enumerate(order):
            text = all_texts[idx]
            values = rng.standard_normal(DIMENSIONS) * 0.05
            line = {
                "instance": {"content": text, "task_type": TASK},
                "predictions": [{"embeddings": {"statistics": {"token_count": len(text) // 4, "truncated": False},
                                                "values": values}}],
                "status": "",
            }
            handles[pos * files // n].write(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    finally:
        for h in handles:
            h.close()
    return paths


GEMINI_MODEL = "gemini-embedding-001"


def write_gemini_output(folder: Path, seed: int, n: int, files: int = FILES_PER_JOB) -> list[Path]:
    """A finished job's output for ``texts(seed, n)`` in the Gemini shape (``key`` + ``response.embedding``,
    as the gemini-api backend and Vertex's Gemini-model jobs answer), ``DIMENSIONS`` values, shuffled order."""
    from batchd.backends import content_hash

    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(n))
    random.Random(seed + 2).shuffle(order)
    all_texts = list(texts(seed, n))
    rng = np.random.default_rng(seed + 3)
    paths = [folder / f"predictions_{k + 1:04d}.jsonl" for k in range(files)]
    handles = [p.open("wb") for p in paths]
    try:
        for pos, idx in enumerate(order):
            key = content_hash(all_texts[idx], GEMINI_MODEL, TASK, DIMENSIONS)
            line = {"key": key, "response": {"embedding": {"values": rng.standard_normal(DIMENSIONS) * 0.05}}}
            handles[pos * files // n].write(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    finally:
        for h in handles:
            h.close()
    return paths


def config(db_path: Path, backend: str = "bench.filebackend:FilesBackend", **over: Any) -> Config:
    data: dict[str, Any] = {
        "database": {"path": str(db_path)},
        "queue": {"min_batch_size": 1, "max_batch_size": 30000, "max_attempts": 3, "max_running_jobs": 100},
        "embedding": {"backend": backend, "model": MODEL, "dimensions": DIMENSIONS, "task_type": TASK},
    }
    for section, values in over.items():
        data.setdefault(section, {}).update(values)
    return from_dict(data, source=str(db_path.parent / "batchd.toml"))


def config_toml(db_path: Path, backend: str = "bench.filebackend:FilesBackend") -> str:
    return (f'[database]\npath = "{db_path}"\n\n[embedding]\nbackend = "{backend}"\nmodel = "{MODEL}"\n'
            f'dimensions = {DIMENSIONS}\ntask_type = "{TASK}"\n')
