"""Where a dataset lives: a local directory or any pyarrow/fsspec filesystem URL; and the
local file-system helpers every stage publishes through (publish by rename, flush, modes,
writability).

Writes are atomic for readers: a local file or directory is written under a temporary
name, flushed and renamed (``publish_file``, ``publish_dir``: shards, manifests, exports,
checkpoints, converted students); on object stores an object becomes visible only once its
upload completes. The manifest is always written last.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow.fs as pafs

from kdpipe.schemas.errors import ConfigError, DatasetError
from kdpipe.schemas.layout import TMP_PREFIX, safe_relpath, tmp_name


class HashingWriter:
    """A write-only stream that hashes what passes through it: a shard's sha256 and size come
    from its single write, without reading the file back.

    The hashing and the writing run on a thread of their own (hashlib and file writes release
    the GIL), so the caller's thread, Parquet's encoder, goes on with the next pages: in a
    capture the shard writer is the host's critical path. On a local file the kernel is asked
    to start writing each chunk back at once, so that the flush before the shard's rename
    waits for little. Use it as a context manager inside the block that owns ``raw``: a clean
    exit waits for every byte; an exception drops what is queued."""

    MAX_QUEUED = 64 << 20     # bytes handed over but not yet written: the memory bound

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest, self.bytes = raw, hashlib.sha256(), 0
        try:
            self._fd: int | None = raw.fileno()
        except (AttributeError, OSError, ValueError):   # an object-store stream
            self._fd = None
        self._written = 0
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._busy = False           # a chunk is being hashed and written
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kdpipe-hash")
        self._thread.start()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._wait_written()
        with self._cv:
            self._stop = True
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join()

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if not isinstance(data, bytes):     # the caller may reuse its buffer once we return
            data = bytes(data)
        with self._cv:
            while self._queued >= self.MAX_QUEUED and self._error is None and not self._stop:
                self._cv.wait()
            self._raise()
            if self._stop:
                raise ValueError("write to a HashingWriter after its block ended")
            self._queue.append(data)
            self._queued += n
            self._cv.notify_all()
        self.bytes += n
        return n

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self._wait_written()
        self.raw.flush()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:     # the owner's block closes (and renames) the raw stream
        self._wait_written()

    def sha256(self) -> str:
        self._wait_written()
        return self.digest.hexdigest()

    def _wait_written(self) -> None:
        with self._cv:
            while (self._queue or self._busy) and self._error is None:
                self._cv.wait()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                data = self._queue.popleft()
                self._busy = True
            try:
                self.digest.update(data)
                self.raw.write(data)
                self._start_writeback(len(data))
            except BaseException as e:   # noqa: BLE001  (raised in the caller's thread)
                with self._cv:
                    self._error = e
                    self._busy = False
                    self._queue.clear()
                    self._cv.notify_all()
                return
            with self._cv:
                self._busy = False
                self._queued -= len(data)
                self._cv.notify_all()

    def _start_writeback(self, n: int) -> None:
        """Ask the kernel to write the bytes just written back now, asynchronously, instead
        of letting them pile up as dirty pages for the flush before the rename."""
        if self._fd is None or not hasattr(os, "posix_fadvise"):
            return
        self.raw.flush()
        os.posix_fadvise(self._fd, self._written, n, os.POSIX_FADV_DONTNEED)
        self._written += n


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
        if not self.local:
            tmp = self.full(tmp_name(rel, uuid.uuid4().hex[:8]))
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
        with publish_file(final) as path, open(path, "wb") as out:
            yield out

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


@contextmanager
def publish_file(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path of the local file ``final`` to write; when the block exits
    cleanly the file is flushed, renamed to ``final`` and the directory flushed, so readers
    and crashes see the old file or the whole new one. When it raises, the file is removed."""
    final = Path(final)
    tmp = final.with_name(tmp_name(final.name, uuid.uuid4().hex[:8]))
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def publish_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A new temporary sibling directory of ``final`` to fill (``.tmp-NAME-XXXXXXXX``, modes as
    a plain mkdir); published with ``publish_tree`` when the block exits cleanly, removed when
    it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        publish_tree(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_tree(tmp: Path, final: Path, *,
                 remove: Callable[[Path], None] = shutil.rmtree) -> None:
    """Flush the directory ``tmp`` (every file, then the directories), put it in ``final``'s
    place (an existing ``final`` deleted with ``remove`` first) and flush the parent: a crash
    never leaves a partial ``final``, nor a published one whose contents are not on disk."""
    fsync_tree(tmp)
    if final.exists():
        remove(final)
    tmp.rename(final)
    fsync_path(final.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_tree(root: Path) -> None:
    """Give the files under ``root`` the modes a plain ``open`` would (0666 and 0777 less the
    umask): transformers writes weights through temporary files created 0600, which would
    leave a checkpoint readable by its owner only."""
    mask = umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(dirpath) / name, 0o666 & ~mask)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then the directories bottom-up, so a rename that
    publishes ``root`` cannot survive a crash that its contents did not."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def check_writable(out: Path, label: str = "out") -> None:
    """``out``, or the nearest existing directory above it, must let this process create
    files: a read-only location is refused before any work is done."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{label} {out}: {existing} is a file, so the directory cannot be "
                          f"created")
    ro_fs = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if ro_fs or not os.access(existing, os.W_OK | os.X_OK):
        what = "is on a read-only filesystem" if ro_fs else "is read-only for this user"
        verb = "write the run" if existing == out else "create the run directory"
        raise ConfigError(f"{label} {out}: {existing} {what}; cannot {verb}")
