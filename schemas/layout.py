"""Names of the files inside a dataset, and the rule that keeps them inside it."""

from __future__ import annotations

import posixpath
import re

from .errors import DatasetError

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
SHARDS_DIR = "shards"
ARTIFACTS_DIR = "artifacts"
TMP_PREFIX = ".tmp-"   # in-progress files; never listed in a manifest, removed on resume

_FRAGMENT_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")


def fragment_path(part: int, count: int) -> str:
    return f"{PARTS_DIR}/part-{part:05d}-of-{count:05d}.json"


def shard_path(part: int, count: int, seq: int) -> str:
    return f"{SHARDS_DIR}/p{part:05d}-of-{count:05d}-{seq:06d}.parquet"


def is_fragment_name(name: str) -> bool:
    return bool(_FRAGMENT_RE.match(name))


def tmp_name(rel: str, token: str) -> str:
    head, tail = posixpath.split(rel)
    return posixpath.join(head, f"{TMP_PREFIX}{token}-{tail}")


def safe_relpath(rel: str, where: str = "manifest") -> str:
    """A manifest path, checked so that it cannot point outside the dataset root."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise DatasetError(f"invalid path {rel!r}", file=where)
    norm = posixpath.normpath(rel)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or ":" in norm.split("/")[0]:
        raise DatasetError(f"path {rel!r} escapes the dataset root", file=where)
    return norm
