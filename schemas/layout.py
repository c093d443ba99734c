"""Names of the files inside a dataset, the rule that keeps them inside it, and where
kdpipe's cache keeps the embedded teacher (capture prepares it, training and the dataset
tools find it there)."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from .errors import DatasetError

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
SHARDS_DIR = "shards"
ARTIFACTS_DIR = "artifacts"
TMP_PREFIX = ".tmp-"   # in-progress files; never listed in a manifest, removed on resume

EMBEDDED_TEACHER = "embedded"            # the name that stands for the embedded teacher
EMBEDDED_TEACHER_NAME = "SmolLM2-135M-Instruct"

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


def cache_dir() -> Path:
    """kdpipe's cache: ``$KDPIPE_CACHE``, else ``~/.cache/kdpipe``."""
    return Path(os.environ.get("KDPIPE_CACHE", Path.home() / ".cache" / "kdpipe"))


def embedded_teacher_dir() -> Path:
    """Where ``kdpipe teacher prepare`` writes the embedded teacher as a safetensors checkpoint."""
    return cache_dir() / "teachers" / EMBEDDED_TEACHER_NAME


def is_embedded_teacher(name: str | None) -> bool:
    return name in ("", EMBEDDED_TEACHER, EMBEDDED_TEACHER_NAME)
