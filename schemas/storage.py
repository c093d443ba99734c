"""Where a dataset lives: a local directory or any pyarrow/fsspec filesystem URL.

Writes are atomic for readers: a local file is written under a temporary name,
fsynced and renamed; on object stores an object becomes visible only once its
upload completes. The manifest is always written last.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import pyarrow.fs as pafs

from .errors import DatasetError
from .layout import TMP_PREFIX, safe_relpath, tmp_name


class HashingWriter:
    """A write-only stream that hashes what passes through it: a shard's sha256 and size come
    from its single write, without reading the file back."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.raw.flush()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:     # the atomic_output block closes (and renames) the raw stream
        pass

    def sha256(self) -> str:
        return self.digest.hexdigest()


class Storage:
    """A dataset root. Paths given to its methods are relative to the root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" in uri and not uri.startswith("file://"):
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
            self.local = False
        else:
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(path)
            self.local = True

    def full(self, rel: str) -> str:
        return posixpath.join(self.root, safe_relpath(rel)) if rel else self.root

    def describe(self, rel: str) -> str:
        """A path for messages: the local path or the URL of the object."""
        if self.local:
            return self.full(rel)
        base, _, _query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{rel}" if rel else base

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self.full(rel)).size

    def listdir(self, rel: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self.full(rel), allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in info)

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.full(rel), recursive=True)

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.full(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise DatasetError("file not found", file=self.describe(rel)) from e

    def open_input(self, rel: str):
        return self.fs.open_input_file(self.full(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.full(rel))
        except FileNotFoundError:
            pass

    @contextmanager
    def atomic_output(self, rel: str) -> Iterator[BinaryIO]:
        """A stream whose content appears under ``rel`` only when the block exits cleanly."""
        final = self.full(rel)
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        tmp = self.full(tmp_name(rel, uuid.uuid4().hex[:8]))
        if not self.local:
            # An object store completes an upload on close even after an error, so write a
            # temporary key and move it (a server-side copy) only when the block succeeded.
            try:
                with self.fs.open_output_stream(tmp) as out:
                    yield out
                self.fs.move(tmp, final)
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except OSError:
                    pass
                raise
            return
        try:
            with open(tmp, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
            fsync_path(posixpath.dirname(final))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_output(rel) as out:
            out.write(data)

    def remove_stale_tmp(self, rel_dir: str) -> list[str]:
        """Delete temporary files a killed writer left behind; returns their names."""
        stale = [n for n in self.listdir(rel_dir) if n.startswith(TMP_PREFIX)]
        for n in stale:
            self.delete(f"{rel_dir}/{n}")
        return stale

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.full(rel)) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
