"""One table of the embedding model families batchd knows: which family a model name belongs to, and that
family's limits, dimensions and price unit. Every "is this a Gemini model?" question is answered here.

Sources (checked 2026-11): Vertex AI "Get batch predictions for text embeddings" (row limits: classic 30,000
rows per job; Gemini 1,000,000 rows and 1 GB of input per job), the model cards (dimensions, input token
limits), Google's Gemini Batch API announcement (Sept 2025). Prices live with the cost ledger.
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


__all__ = ["CLASSIC", "CLASSIC_MODELS", "GEMINI", "GEMINI_MODELS", "LOCAL", "ModelFamily", "family_of",
           "is_google_model"]
