"""The Google side of the benchmark: the tests' own VertexServices (the Cloud Storage emulator, a subprocess, and
the fake Vertex JobService, a thread of this process) with the benchmark's bucket, plus finished jobs registered
on it. batchd reaches them through the real google-cloud-storage and aiplatform clients (VertexBackend), from a
child process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import data
from tests.fakes.vertex_env import VertexServices

BUCKET = "batchd-bench"
PROJECT = "bench"
LOCATION = "us-central1"


class VertexEnv(VertexServices):
    """The test suite's fakes (tests/fakes/vertex_env.py) with the benchmark's bucket and project."""

    def __init__(self) -> None:
        super().__init__(bucket=BUCKET, project=PROJECT, location=LOCATION)

    @property
    def settings(self) -> dict[str, Any]:
        """The [vertex] section. cleanup is off so that several databases can sync the same finished job."""
        return {**super().settings, "cleanup": False}

    def finished_job(self, files: list[Path], name: str) -> str:
        """Upload a finished job's output files and register a SUCCEEDED classic job pointing at them on the
        fake JobService (as if Vertex had run it). Returns the job's resource name."""
        from google.cloud import aiplatform_v1

        folder = f"gs://{BUCKET}/jobs/{name}/prediction-model-2026-11-30T09:00:00.000000Z/"
        bucket = self.client.bucket(BUCKET)
        for f in files:
            bucket.blob(f"jobs/{name}/prediction-model-2026-11-30T09:00:00.000000Z/{f.name}").upload_from_filename(
                str(f), timeout=600)
        spec = aiplatform_v1.BatchPredictionJob(
            display_name=f"bench-{name}", model=f"publishers/google/models/{data.MODEL}",
            input_config={"instances_format": "jsonl", "gcs_source": {"uris": [f"gs://{BUCKET}/jobs/{name}/in.jsonl"]}},
            output_config={"predictions_format": "jsonl",
                           "gcs_destination": {"output_uri_prefix": f"gs://{BUCKET}/jobs/{name}/"}})
        job = self.fake.create(f"projects/{PROJECT}/locations/{LOCATION}",
                               aiplatform_v1.BatchPredictionJob.to_json(spec).encode())
        with self.fake.lock:
            job.output_info.gcs_output_directory = folder
            job.state = aiplatform_v1.JobState.JOB_STATE_SUCCEEDED
        return str(job.name)
