"""Error types shared by every stage.

Each error says what is wrong and where (file, row, field), so the CLI can print
it as one line instead of a traceback.
"""

from __future__ import annotations


class KdpipeError(Exception):
    """Base of every error kdpipe raises on purpose (bad input, bad config, bad data)."""


class ConfigError(KdpipeError):
    """A configuration or command-line value is invalid or inconsistent."""


class FormatVersionError(KdpipeError):
    """A dataset was written by a newer, incompatible format version."""


class CodecMismatchError(KdpipeError):
    """Data was encoded with one codec configuration and is being read with another."""


class DatasetError(KdpipeError):
    """A dataset file, row or field is missing, malformed or corrupt."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.row, self.field = file, row, field
        where = [p for p in (file, None if row is None else f"row {row}",
                             None if field is None else f"field {field!r}") if p]
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class CodecError(DatasetError):
    """Encoded bytes cannot be decoded (wrong length, out-of-range ids, corrupt stream)."""
