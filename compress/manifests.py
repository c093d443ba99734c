"""A dataset's manifest files, read, merged and written in one place.

Each capture part keeps a fragment (``parts/part-IIIII-of-NNNNN.json``), replaced atomically
at every commit; ``manifest.json`` is their union, written once every part is complete.
Readers take ``manifest.json`` when present, else the union of the fragments. The format
itself (the dataclasses, the checksum) is ``kdpipe.schemas.manifest``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import pyarrow.fs as pafs

from kdpipe.schemas import DatasetError, Manifest
from kdpipe.schemas.layout import MANIFEST, PARTS_DIR, is_fragment_name

from .storage import Storage


def fragment_files(storage: Storage) -> list[str]:
    """Every part fragment, as relative paths."""
    return [f"{PARTS_DIR}/{n}" for n in storage.listdir(PARTS_DIR) if is_fragment_name(n)]


def manifest_files(storage: Storage) -> list[str]:
    """``manifest.json`` (if present) and every part fragment, as relative paths."""
    return [MANIFEST] * storage.exists(MANIFEST) + fragment_files(storage)


def read_manifest(storage: Storage, rel: str) -> Manifest:
    """The manifest or fragment at ``rel``, checksum verified; errors name the file."""
    return Manifest.from_json(storage.read_bytes(rel), storage.describe(rel))


def write_fragment(storage: Storage, rel: str, fragment: Manifest) -> None:
    """Replace a part's fragment atomically."""
    storage.write_bytes(rel, fragment.to_json().encode())


def load_manifest_or_fragments(storage: Storage, *, allow_incomplete: bool = False,
                               missing_ok: bool = False,
                               prefer_fragments: bool = False) -> Manifest | None:
    """``manifest.json`` if present (unless ``prefer_fragments``), else the union of fragments."""
    if not prefer_fragments and storage.exists(MANIFEST):
        return read_manifest(storage, MANIFEST)
    frags = [(storage.describe(rel), read_manifest(storage, rel))
             for rel in fragment_files(storage)]
    if not frags:
        if missing_ok:
            return None
        kind = storage.fs.get_file_info(storage.full("")).type
        if kind == pafs.FileType.NotFound:
            raise DatasetError("no such dataset directory", file=storage.describe(""))
        if kind == pafs.FileType.File:
            raise DatasetError("is a file; a kdpipe dataset is a directory holding "
                               "manifest.json and shards/", file=storage.describe(""))
        raise DatasetError("no manifest.json and no part fragments: not a kdpipe dataset "
                           "(or a capture that has not committed anything yet)",
                           file=storage.describe(""))
    check_fragment_artifacts(frags)
    merged = merge_fragments(frags)
    if not merged.complete and not allow_incomplete:
        count = merged.parts[0].count
        done = [p.index for p in merged.parts if p.complete]
        missing = sorted(set(range(count)) - set(done))
        raise DatasetError(f"incomplete dataset: parts {missing} of {count} are missing or "
                           f"still running", file=storage.describe(""))
    return merged


def check_fragment_artifacts(fragments: Sequence[tuple[str, Manifest]]) -> None:
    """Part fragments that list the same artifact must list the same file content."""
    seen: dict[str, tuple[str, str]] = {}
    for name, frag in fragments:
        for rel, entry in frag.artifacts.items():
            digest = entry.get("sha256") if isinstance(entry, dict) else None
            if rel in seen and seen[rel][1] != digest:
                raise DatasetError(f"artifact {rel} has sha256 {str(digest)[:16]}... here but "
                                   f"{str(seen[rel][1])[:16]}... in {seen[rel][0]} (parts "
                                   f"encoded with different codec side data)", file=name)
            seen.setdefault(rel, (name, digest))


def merge_fragments(fragments: list[tuple[str, Manifest]]) -> Manifest:
    """Union of part fragments into one manifest; they must agree on everything but content."""
    if not fragments:
        raise DatasetError("no manifest and no part fragments found")
    fragments = sorted(fragments, key=lambda nf: nf[1].parts[0].index if nf[1].parts else -1)
    first_name, first = fragments[0]
    merged = Manifest(teacher=first.teacher, capture=first.capture, codec=first.codec,
                      artifacts=dict(first.artifacts), format_version=first.format_version,
                      producer=first.producer)
    seen: set[int] = set()
    for name, frag in fragments:
        for attr in ("teacher", "codec"):
            if getattr(frag, attr) != getattr(first, attr):
                raise DatasetError(f"{attr} differs from that of {first_name}", file=name)
        a, b = asdict(frag.capture), asdict(first.capture)
        if a != b:
            diff = sorted(k for k in a if a[k] != b[k])
            raise DatasetError(f"capture settings {diff} differ from those of {first_name}",
                               file=name)
        for p in frag.parts:
            if p.index in seen:
                raise DatasetError(f"part {p.index} appears in two fragments", file=name)
            seen.add(p.index)
        merged.parts.extend(frag.parts)
        merged.shards.extend(frag.shards)
        merged.records.add(frag.records)
        merged.artifacts.update(frag.artifacts)
    merged.parts.sort(key=lambda p: p.index)
    merged.shards.sort(key=lambda s: (s.part, s.seq))
    return merged


def write_manifest_if_complete(storage: Storage) -> Manifest | None:
    """Write ``manifest.json`` as the union of the fragments once every part is complete."""
    merged = load_manifest_or_fragments(storage, allow_incomplete=True, prefer_fragments=True)
    if not merged.complete:
        return None
    text = merged.to_json().encode()
    if not storage.exists(MANIFEST) or storage.read_bytes(MANIFEST) != text:
        storage.write_bytes(MANIFEST, text)
    return merged
