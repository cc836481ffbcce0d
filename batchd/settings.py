"""The building blocks of settings, shared by batchd's own config and every backend's settings dataclass.

A section of the TOML file becomes a frozen dataclass whose fields are ``str``, ``int``, ``bool`` or
:class:`Duration`, with defaults. Its optional ``validate()`` raises :class:`SettingError` naming the key (within
the section) and the reason; :func:`batchd.config.build_settings` turns that into a ConfigError naming the file
and ``section.key`` (exit status 78). No I/O, no imports of the rest of batchd: backends' settings modules
import this, and the config module imports them.
"""

from __future__ import annotations


class Duration(float):
    """Seconds, written in TOML as a string with a unit."""


class SettingError(ValueError):
    """Raised by a settings dataclass's ``validate()``: ``key`` (within its section) and why it is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def check_backoff(backoff: float, deadline: float, section: str) -> None:
    """The retry settings both batch services' backends have (``retry_backoff``, the first wait after a 429/5xx,
    doubling; ``retry_deadline``, when to give up one call): raise SettingError when the first wait alone is
    longer than the whole deadline."""
    if backoff > deadline:
        raise SettingError("retry_backoff", f"{backoff:g}s is longer than {section}.retry_deadline ({deadline:g}s)")


__all__ = ["Duration", "SettingError", "check_backoff"]
