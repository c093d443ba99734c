"""Where commands write: never over what kdpipe did not write, never into what they read.

``compress`` and ``import`` write a kdpipe dataset into a directory that is new, empty or
an earlier kdpipe dataset (resumed, or with ``--overwrite`` replaced: only the files of
the dataset layout are removed). ``export`` writes into a directory that is new, empty or,
with ``--overwrite``, an earlier export (only its files are removed). Anything else in the
way is refused with the names of what is there, and no output may be or lie inside a
dataset the command reads, or the reverse.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas import ConfigError, KdpipeError
from kdpipe.schemas.layout import (ARTIFACTS_DIR, MANIFEST, PARTS_DIR, SHARDS_DIR, TMP_PREFIX,
                                   is_fragment_name)

from .manifests import manifest_files, read_manifest
from .reader import artifact_relpath
from .storage import Storage, publish_file

DATASET_ENTRIES = {MANIFEST, PARTS_DIR, SHARDS_DIR, ARTIFACTS_DIR}
_SHARD_RE = re.compile(r"^p\d{5}-of-\d{5}-\d{6}\.parquet$")
_SHOWN = 5   # names listed in a refusal


def _listing(names: list[str]) -> str:
    more = f", ... ({len(names)} entries)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_output_file(path: str, option: str) -> str:
    """A file to be written: its directory must exist and the path must not be a directory."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a directory, expected a file name")
    if not p.absolute().parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {p.absolute().parent} does not exist")
    return path


def check_not_source(out: str, sources: list[str], option: str) -> None:
    """Refuse an output that is, or is inside, or contains, a dataset being read."""
    target = Storage(out)
    for src in sources:
        s = Storage(src)
        if s.local != target.local:
            continue
        a, b = (os.path.realpath(x.root) if x.local else x.root for x in (target, s))
        a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise ConfigError(f"{option} {out}: overlaps {src}, which this command reads; "
                              f"write to a directory outside it")


def prepare_dataset_output(out: str, *, sources: list[str], overwrite: bool,
                           option: str = "DST") -> None:
    """Make sure writing a kdpipe dataset to ``out`` clobbers nothing kdpipe did not write;
    with ``overwrite``, first remove an earlier dataset there (its layout's files only)."""
    check_not_source(out, sources, option)
    storage = Storage(out)
    if storage.local and Path(storage.root).is_file():
        raise ConfigError(f"{option} {out}: is a file, expected a dataset directory")
    entries = storage.listdir("")
    foreign = [n for n in entries if n not in DATASET_ENTRIES]
    if foreign:
        raise ConfigError(f"{option} {out}: exists and is not a kdpipe dataset (holds "
                          f"{_listing(foreign)}); choose a new or empty directory")
    if entries and overwrite:
        remove_dataset_files(storage)


def _listed_artifacts(storage: Storage) -> set[str]:
    """Artifact paths that the dataset's readable manifest and fragments list."""
    listed = set()
    for rel in manifest_files(storage):
        try:
            listed |= {artifact_relpath(a) for a in read_manifest(storage, rel).artifacts}
        except KdpipeError:  # a damaged manifest, or one naming paths outside artifacts/:
            continue         # nothing it lists is removed
    return listed


def remove_dataset_files(storage: Storage) -> list[str]:
    """Delete the files of a kdpipe dataset (manifest, fragments, shards, listed artifacts,
    temporary files) and nothing else; returns what was deleted."""
    doomed = [f"{ARTIFACTS_DIR}/{n}" for n in storage.listdir(ARTIFACTS_DIR)
              if n.startswith(TMP_PREFIX)]
    doomed += sorted(a for a in _listed_artifacts(storage) if storage.exists(a))
    doomed += [f"{SHARDS_DIR}/{n}" for n in storage.listdir(SHARDS_DIR)
               if _SHARD_RE.match(n) or n.startswith(TMP_PREFIX)]
    doomed += [f"{PARTS_DIR}/{n}" for n in storage.listdir(PARTS_DIR)
               if is_fragment_name(n) or n.startswith(TMP_PREFIX)]
    doomed += [MANIFEST] * storage.exists(MANIFEST)
    for rel in doomed:
        storage.delete(rel)
    if storage.local:
        for sub in (ARTIFACTS_DIR, SHARDS_DIR, PARTS_DIR):
            try:
                os.rmdir(storage.full(sub))
            except OSError:   # absent, or holds something kdpipe did not write: kept
                pass
    return doomed


class ExportDir:
    """An export's output directory: files appear whole (temporary name, then rename); if
    the export fails, the files this run wrote are removed again.

    ``is_export_file`` recognizes the names an export of this format writes: a directory
    holding only such files may be replaced with ``overwrite``; anything else is refused.
    """

    def __init__(self, out: str | Path, *, sources: list[str], overwrite: bool,
                 is_export_file: Callable[[str], bool], option: str = "OUT") -> None:
        self.path = Path(out)
        check_not_source(str(out), sources, option)
        if self.path.is_file():
            raise ConfigError(f"{option} {out}: is a file, expected a directory")
        existing = sorted(os.listdir(self.path)) if self.path.is_dir() else []
        foreign = [n for n in existing if not is_export_file(n) and not n.startswith(TMP_PREFIX)]
        if foreign:
            raise ConfigError(f"{option} {out}: holds files that are not an export of this "
                              f"format ({_listing(foreign)}); choose a new or empty directory")
        if existing and not overwrite:
            raise ConfigError(f"{option} {out}: holds an earlier export ({_listing(existing)}); "
                              f"pass --overwrite to replace it, or choose another directory")
        for name in existing:
            (self.path / name).unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def _atomic(self, name: str, write: Callable[[Path], None]) -> None:
        final = self.path / name
        with publish_file(final) as tmp:
            write(tmp)
        self.written.append(final)

    def write_table(self, name: str, table: pa.Table) -> None:
        self._atomic(name, lambda p: pq.write_table(table, p, compression="zstd"))

    def write_text(self, name: str, text: str) -> None:
        self._atomic(name, lambda p: p.write_text(text))

    def __enter__(self) -> "ExportDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for path in self.written:
                path.unlink(missing_ok=True)
