"""The local backend's settings: the ``[local]`` section, built and validated by itself (the model is looked
up, and its dimensions compared, by :func:`batchd.backends.local_model.find_model` when the backend is loaded:
that reads files, which parsing never does)."""

from __future__ import annotations

from dataclasses import dataclass

from batchd.settings import SettingError


@dataclass(frozen=True)
class LocalSettings:
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 64
    slice_size: int = 256
    device: str = "cpu"

    def validate(self) -> None:
        for key in ("batch_size", "slice_size"):
            if getattr(self, key) < 1:
                raise SettingError(key, "must be at least 1")


__all__ = ["LocalSettings"]
