"""One error hierarchy for herd.

Messages say what was wrong, where (file, line, field) and what to do about it.
Only ``TransientIOError`` is retried by the task layer.
"""

from __future__ import annotations


class HerdError(Exception):
    """Base class of every error herd raises on purpose."""


class ConfigError(HerdError):
    """A configuration value is invalid; the message names the field to change."""


class DataValidationError(HerdError):
    """Input data is malformed; the message names the file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"line {line}" if line is not None else "",
                f"field {field!r}" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.line, self.field, self.reason = file, line, field, message


class TransientIOError(HerdError):
    """A network or filesystem operation failed in a way that may succeed on retry."""


class DivergenceError(HerdError):
    """Training diverged (loss became NaN/inf or exploded)."""


class MissingAssetError(HerdError):
    """An offline asset (package, model file, word list) is not available on this machine."""
