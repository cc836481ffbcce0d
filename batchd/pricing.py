"""What embedding costs: the built-in price of every model batchd supports, the `[pricing]` override, and the
rules that turn what was sent or answered into US dollars.

Every figure carries its date and source. A model without a known price has the price ``None``, and every cost
computed from it is ``None`` too (shown as null / "unknown"): batchd never guesses a number.

Billing rules (the units Google bills in):

- Character-priced models (classic ``text-embedding-*``): "Characters are counted by UTF-8 code points and white
  space is excluded from the count" (Vertex AI generative AI pricing page,
  https://cloud.google.com/vertex-ai/generative-ai/pricing, checked 2026-11-30). :func:`billable_characters`
  implements that rule: every code point that is not white space (``str.isspace``).
- Token-priced models (``gemini-embedding-001``): input tokens, as the service reports them per answered line
  (``response.tokenCount``). Before a batch runs, tokens are *estimated* at one token per 4 characters
  (:func:`estimate_tokens`), Google's rule of thumb for Gemini models ("a token is equivalent to about 4
  characters", Gemini API docs, "Understand and count tokens"); the real counts replace the estimate once known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from batchd.config import Config

UNITS = ("1k_characters", "1m_tokens", "none")
CHARS_PER_TOKEN = 4  # Google's rule of thumb for Gemini models (see the module docstring)

_VERTEX_PRICING = "https://cloud.google.com/vertex-ai/generative-ai/pricing"


@dataclass(frozen=True)
class Price:
    """The price of one model: USD per unit, batch and online. ``None`` = not known."""

    model: str
    unit: str  # one of UNITS
    batch_usd: float | None
    online_usd: float | None
    date: str = ""
    source: str = ""

    def cost(self, billable_characters: int, tokens: int, *, online: bool = False) -> float | None:
        """USD for this much input at this price; None when the price (or the needed count) is unknown."""
        per = self.online_usd if online else self.batch_usd
        if self.unit == "none":
            return 0.0
        if per is None:
            return None
        if self.unit == "1k_characters":
            return billable_characters / 1000.0 * per
        return tokens / 1_000_000.0 * per


_CLASSIC_SOURCE = (f"{_VERTEX_PRICING} (Embeddings for Text: $0.000025 online, $0.00002 batch per 1,000 "
                   "characters; the same figures for text-embedding-004, -005 and text-multilingual-embedding-002)")
_GEMINI_SOURCE = ("Google's Gemini Batch API announcement (Sept 2025) and " + _VERTEX_PRICING +
                  ": gemini-embedding-001 $0.15 online, $0.075 batch per 1M input tokens")

BUILT_IN: dict[str, Price] = {
    "text-embedding-005": Price("text-embedding-005", "1k_characters", 0.00002, 0.000025, "2026-11-30", _CLASSIC_SOURCE),
    "text-embedding-004": Price("text-embedding-004", "1k_characters", 0.00002, 0.000025, "2026-11-30", _CLASSIC_SOURCE),
    "text-multilingual-embedding-002": Price("text-multilingual-embedding-002", "1k_characters", 0.00002, 0.000025,
                                             "2026-11-30", _CLASSIC_SOURCE),
    "gemini-embedding-001": Price("gemini-embedding-001", "1m_tokens", 0.075, 0.15, "2026-11-30", _GEMINI_SOURCE),
}

LOCAL_SOURCE = "runs on this machine: no per-text charge"


def builtin_price(model: str, backend: str = "vertex") -> Price:
    """The built-in figure for ``model`` on ``backend``; an unknown model gets ``None`` prices (never a guess)."""
    if backend == "local":
        return Price(model, "none", 0.0, 0.0, "", LOCAL_SOURCE)
    known = BUILT_IN.get(model)
    if known is not None:
        return known
    unit = "1m_tokens" if model.startswith("gemini-") else "1k_characters"
    return Price(model, unit, None, None, "", "no built-in price for this model: set [pricing] in the config")


def price_for(config: Config, model: str | None = None) -> Price:
    """The price in force for ``model`` (default: the configured one): ``[pricing]`` when it names the model,
    else the built-in table."""
    model = model or config.embedding.model
    p = config.pricing
    if p.model and p.model == model:
        return Price(model, p.unit, p.batch_usd, p.online_usd, "", f"[pricing] in {config.source}")
    backend = config.embedding.backend if model == config.embedding.model else "vertex"
    return builtin_price(model, backend)


def price_from_record(model: str, unit: str | None, batch_usd: float | None, online_usd: float | None) -> Price:
    """A price as recorded on a batch (the one in force when the batch was applied)."""
    return Price(model, unit or "1k_characters", batch_usd, online_usd)


_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())


def billable_characters(text: str) -> int:
    """Google's count for character-priced models: Unicode code points, white space excluded (``str.isspace``)."""
    if text.isascii():  # the common case, ~5x faster than splitting: one C pass deleting ASCII white space
        return len(text.encode("ascii").translate(None, _ASCII_SPACE))
    return sum(map(len, text.split()))  # str.split() splits on exactly the characters str.isspace() accepts


def estimate_tokens(characters: int) -> int:
    """Tokens of a text of ``characters`` code points, at about 4 characters per token (rounded up)."""
    return math.ceil(characters / CHARS_PER_TOKEN) if characters > 0 else 0


__all__ = ["BUILT_IN", "CHARS_PER_TOKEN", "UNITS", "Price", "billable_characters", "builtin_price",
           "estimate_tokens", "price_for", "price_from_record"]
