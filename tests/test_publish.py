"""Publishing by rename (compress.storage): the new content appears whole, flushed before the
rename; a failure leaves the old content and no temporary behind. The shards' hashing stream
writes in order on its thread and reports its errors to the caller."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import time

import numpy as np
import pytest

from kdpipe.compress import publish_dir, publish_file
from kdpipe.compress.storage import HashingWriter, umask


def test_publish_dir_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    final = tmp_path / "out" / "student"
    final.mkdir(parents=True)
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with publish_dir(final) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(final.parent) == ["student"] and os.listdir(final) == ["old.txt"]

    synced, fsync = [], os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    with publish_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert os.listdir(final.parent) == ["student"] and os.listdir(final) == ["sub"]
    assert {str(tmp / "sub" / "new.txt"), str(tmp / "sub"), str(tmp),
            str(final.parent)} <= set(synced)
    assert oct(final.stat().st_mode & 0o777) == oct(0o777 & ~umask())


def test_publish_file_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "rows.parquet"
    final.write_text("old")
    with pytest.raises(OSError):
        with publish_file(final) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == ["rows.parquet"] and final.read_text() == "old"
    with publish_file(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-")
        tmp.write_text("new")
    assert os.listdir(tmp_path) == ["rows.parquet"] and final.read_text() == "new"



def test_hashing_writer_hashes_and_writes_in_order(tmp_path):
    """The bytes reach the file in order and the digest is the file's, whatever the chunk sizes
    (more than the queue bound in all, so the writer waits for its thread on the way)."""
    rng = np.random.default_rng(0)
    chunks = [rng.bytes(int(n)) for n in rng.integers(0, 3 << 20, 60)] + [b"", b"tail"]
    path = tmp_path / "shard.parquet"
    with open(path, "wb") as raw, HashingWriter(raw) as sink:
        for c in chunks:
            assert sink.write(memoryview(c)) == len(c)
        assert sink.tell() == sum(map(len, chunks))
        sink.flush()
    data = path.read_bytes()
    assert data == b"".join(chunks)
    assert sink.sha256() == hashlib.sha256(data).hexdigest() and sink.bytes == len(data)


def test_hashing_writer_raises_the_write_error_in_the_caller(tmp_path):
    """A failing write (a full disk) surfaces at the caller's next write or flush, and the
    block then ends without waiting on anything."""
    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    sink = HashingWriter(Full())
    with pytest.raises(OSError, match="No space left"):
        with sink:
            sink.write(b"x" * 1024)
            sink.flush()
    with pytest.raises(OSError, match="No space left"):
        sink.write(b"more")


def test_hashing_writer_drops_the_queue_on_an_exception():
    """An exception inside the block (an aborted shard) ends the thread without writing what
    is still queued (up to the queue's bound); later writes are refused."""
    class Slow(io.BytesIO):
        def write(self, data):
            time.sleep(0.05)
            return super().write(data)

    raw, chunk = Slow(), 4 << 20
    with pytest.raises(RuntimeError):
        with HashingWriter(raw) as sink:
            for _ in range(40):
                sink.write(b"y" * chunk)
            raise RuntimeError("abort")
    assert not sink._thread.is_alive()
    assert len(raw.getvalue()) <= 40 * chunk - HashingWriter.MAX_QUEUED + chunk
    with pytest.raises(ValueError):
        sink.write(b"z")
