"""A capture that runs out of disk: clear error, nothing partial visible, resumable after."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress.verify import dump_arrays, verify_dataset
from kdpipe.schemas import DatasetError
from tests.helpers import docstring_texts, write_jsonl


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_disk_full_then_resume(small_disk: Path, tmp_path, teacher_dir, writer):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docstring_texts(8, 300)])
    opts = dict(model=str(teacher_dir), data=str(data), top_k=8, max_seq_len=48, window=2,
                docs_per_shard=2, hidden_layers="0,15,30", progress=False)
    reference = tmp_path / "ref"
    run_capture(CaptureOptions(out=str(reference), **opts))
    need = sum(p.stat().st_size for p in (reference / "shards").iterdir())
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (4 * 2**20 - need // 2))   # room for about half the shards
    out = small_disk / "ds"
    with pytest.raises(DatasetError, match="No space left on device.*rerun the same command"):
        run_capture(CaptureOptions(out=str(out), writer=writer, **opts))
    assert not (out / "manifest.json").exists()
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]
    filler.unlink()
    run_capture(CaptureOptions(out=str(out), **opts))
    assert verify_dataset(str(out), deep=True).ok
    a, b = dump_arrays(str(reference)), dump_arrays(str(out))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
