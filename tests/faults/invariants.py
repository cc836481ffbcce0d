"""The promises every fault test checks at the end, on the real database and the test backend's job files.

- every chunk is READY with the vector of its CURRENT text, or FAILED with a reason, or PENDING and not in
  flight (``idle=True``: nothing PENDING at all);
- no vector is stale: any vector in chunks_vec belongs to an existing chunk and is the vector of its current text;
- exactly one remote job per local batch that has a job name, at most one for any other batch, none for a batch
  this database does not know; no text was ever sent in two jobs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tests.fakes.membackend import fake_vector
from tests.storehelp import store_chunks, store_vector


def remote_jobs(backend_dir: Path, instance_id: str | None) -> list[dict[str, Any]]:
    """The test backend's jobs created for one database (instance), or for every one (None)."""
    import json

    jobs = []
    for p in sorted(backend_dir.glob("job-*.json")):
        job = json.loads(p.read_text())
        if instance_id is None or job.get("instance") == instance_id:
            jobs.append(job)
    return jobs


def problems(store: Any, backend_dir: Path, *, idle: bool = True, texts_once: bool = True) -> list[str]:
    """Everything wrong with the database and its remote jobs, as readable lines (empty: all promises kept)."""
    out: list[str] = []
    dims = store.dimensions
    batches = {b.id: b for b in store.batches()}
    active = {i for i, b in batches.items() if b.status in ("PENDING", "RUNNING")}
    chunks = store_chunks(store)
    with_vector = 0
    for c in chunks:
        cid, st, text = c["id"], c["embedding_status"], c["text"]
        vec = store_vector(store, cid)
        if vec is not None:
            with_vector += 1
            if vec != fake_vector(text, dims):
                out.append(f"chunk {cid} ({st}) has a stale vector (not the vector of its current text)")
        if st == "READY":
            if vec is None:
                out.append(f"chunk {cid} is READY without a vector")
            if c["batch_job_id"] is not None:
                out.append(f"chunk {cid} is READY but still claimed by batch {c['batch_job_id']}")
        elif st == "FAILED":
            if not c["error_message"]:
                out.append(f"chunk {cid} is FAILED without a reason")
        elif st == "PENDING":
            if idle:
                out.append(f"chunk {cid} is still PENDING (batch {c['batch_job_id']}) after the queue went idle")
            elif c["batch_job_id"] is not None and c["batch_job_id"] not in active:
                out.append(f"chunk {cid} is claimed by batch {c['batch_job_id']}, which is not in flight")
        else:
            out.append(f"chunk {cid} has status {st!r}")
    orphans = store.vector_count() - with_vector
    if orphans:
        out.append(f"{orphans} vector(s) in chunks_vec belong to no chunk (deleted ids keep vectors)")

    jobs = remote_jobs(backend_dir, store.instance_id)
    per_batch = Counter(int(j["batch_id"]) for j in jobs)
    for batch_id, n in per_batch.items():
        if batch_id not in batches:
            out.append(f"remote job(s) for batch {batch_id}, which this database does not know")
        if n > 1:
            out.append(f"batch {batch_id} has {n} remote jobs (paid {n} times)")
    # A batch finished before this database became a new instance (a copy) names a job of its old instance.
    every = {j["name"]: j for j in remote_jobs(backend_dir, None)}
    per_key = Counter((j["instance"], int(j["batch_id"])) for j in every.values())
    for b in batches.values():
        if not b.google_job_id:
            continue
        job = every.get(b.google_job_id)
        if job is None:
            out.append(f"batch {b.id} names job {b.google_job_id}, which does not exist")
        elif int(job["batch_id"]) != b.id or per_key[(job["instance"], b.id)] != 1:
            out.append(f"batch {b.id} names job {b.google_job_id} but {per_key[(job['instance'], b.id)]} remote "
                       f"jobs exist for it")
    if texts_once:
        sent = Counter(key for j in jobs for key, _ in j["items"])
        twice = [k for k, n in sent.items() if n > 1]
        if twice:
            out.append(f"{len(twice)} text(s) were sent in more than one job")
    return out
