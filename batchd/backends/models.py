"""One table of the embedding model families batchd knows: which family a model name belongs to, and that
family's limits, dimensions and price unit. Every "is this a Gemini model?" question is answered here.

Sources (checked 2026-11): Vertex AI "Get batch predictions for text embeddings" (row limits: classic 30,000
rows per job; Gemini 1,000,000 rows and 1 GB of input per job), the model cards (dimensions, input token
limits), Google's Gemini Batch API announcement (Sept 2025); for the Gemini Developer API's Batch Mode, the
sources listed in :data:`GEMINI_API_SERVICE`. Prices live with the cost ledger.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "classic", "gemini", "local"
    max_rows: int | None  # rows per batch job; None = no service limit
    max_input_bytes: int | None  # bytes of JSONL input per job; None = no service limit
    max_input_tokens: int | None  # per text; longer input is truncated by the service (auto_truncate)
    default_dimensions: int
    allowed_dimensions: tuple[int, ...] | None  # None = any from 1 to the default
    price_unit: str  # "1k_characters" | "1m_tokens" | "none"


CLASSIC = ModelFamily("classic", 30_000, None, 2_048, 768, None, "1k_characters")
GEMINI = ModelFamily("gemini", 1_000_000, 1_000_000_000, 2_048, 3_072, None, "1m_tokens")
LOCAL = ModelFamily("local", None, None, None, 384, None, "none")

# The same model through the Gemini Developer API's Batch Mode (backend "gemini-api"): no row limit is documented;
# the input file is (2 GiB per file, Files API). Dimensions: any up to 3072 is accepted (Matryoshka);
# Google recommends 768, 1536 or 3072.
GEMINI_API = ModelFamily("gemini-api", None, 2 * 1024**3, 2_048, 3_072, None, "1m_tokens")


@dataclass(frozen=True)
class ServiceLimits:
    """Limits and lifecycle a batch service imposes beyond the model, each with where it is written."""

    name: str
    max_input_file_bytes: int  # one uploaded input file
    file_ttl_seconds: int  # uploaded and generated files are deleted after this long
    max_concurrent_batches: int  # per project, batches not yet finished
    quota_status: int  # what an exhausted quota (enqueued tokens per model) answers: a deferral, not a failure
    sources: tuple[str, ...]


GEMINI_API_SERVICE = ServiceLimits(
    name="gemini-api",
    max_input_file_bytes=2 * 1024**3,  # "Input file size limit: 2GB" (rate-limits page, Batch API section)
    file_ttl_seconds=48 * 3600,  # "Files are stored for 48 hours" (Files API guide)
    max_concurrent_batches=100,  # "Concurrent batch requests: 100" (rate-limits page, Batch API section)
    quota_status=429,  # "Batch enqueued tokens" per model and tier; exceeding it answers 429 RESOURCE_EXHAUSTED
    sources=(
        "ai.google.dev/gemini-api/docs/rate-limits#batch-mode (checked 2026-11)",
        "ai.google.dev/gemini-api/docs/files (checked 2026-11)",
        "ai.google.dev/gemini-api/docs/batch-mode (checked 2026-11)",
        "Gemini Batch API embeddings announcement, Sept 2025: gemini-embedding-001 $0.075 vs $0.15 per 1M tokens",
    ),
)

CLASSIC_MODELS = ("text-embedding-005", "text-multilingual-embedding-002", "text-embedding-004")
GEMINI_MODELS = ("gemini-embedding-001",)


def family_of(model: str) -> ModelFamily:
    """The family of a Vertex/Gemini model name; anything else is treated as classic on Vertex."""
    if model.startswith("gemini-"):
        return GEMINI
    return CLASSIC


def is_google_model(model: str) -> bool:
    """True for names of Google's hosted models (which must never label a local model's vectors)."""
    return model in CLASSIC_MODELS or model.startswith("gemini-") or model.startswith("text-embedding-") \
        or model.startswith("text-multilingual-embedding-")


__all__ = ["CLASSIC", "CLASSIC_MODELS", "GEMINI", "GEMINI_API", "GEMINI_API_SERVICE", "GEMINI_MODELS", "LOCAL",
           "ModelFamily", "ServiceLimits", "family_of", "is_google_model"]
