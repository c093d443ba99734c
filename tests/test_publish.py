"""Publishing by rename (compress.storage): the new content appears whole, flushed before the
rename; a failure leaves the old content and no temporary behind."""

from __future__ import annotations

import os

import pytest

from kdpipe.compress import publish_dir, publish_file
from kdpipe.compress.storage import umask


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

