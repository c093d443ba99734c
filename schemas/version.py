"""Format and producer versions.

The dataset format is versioned MAJOR.MINOR: a reader accepts any minor version
of its own major (minor versions only add optional fields) and refuses a newer major.
"""

from __future__ import annotations

from importlib import metadata

from .errors import FormatVersionError

FORMAT_NAME = "kdpipe-dataset"
FORMAT_VERSION = "2.0"


def producer_version() -> str:
    try:
        return metadata.version("kdpipe")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def check_format_version(found: str, where: str) -> None:
    """Refuse data whose major format version this reader does not know."""
    try:
        major = int(str(found).split(".")[0])
    except ValueError as e:
        raise FormatVersionError(f"{where}: unreadable format version {found!r}") from e
    ours = int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise FormatVersionError(
            f"{where}: written by format version {found}, this kdpipe reads up to "
            f"{ours}.x; upgrade kdpipe to read it")
    if major < ours:
        raise FormatVersionError(
            f"{where}: format version {found} is older than {ours}.x and has no reader here")


def is_newer_minor(found: str) -> bool:
    """Whether ``found`` (a version of our major) is a newer minor one than ours."""
    try:
        return int(str(found).split(".")[1]) > int(FORMAT_VERSION.split(".")[1])
    except (IndexError, ValueError):
        return False
