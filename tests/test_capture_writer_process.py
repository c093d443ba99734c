"""The capture's writer process: the same bytes as the in-process writer, its failures reach
the capture at once, and a dead capture leaves it nothing half-written to publish."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset
from kdpipe.compress.codecs import HIDDEN
from kdpipe.compress.codecs.hidden import fit_lowrank
from kdpipe.compress.verify import verify_dataset
from kdpipe.schemas import ConfigError
from tests.helpers import docstring_texts, write_jsonl

TEXTS = docstring_texts(10, 300)
OPTS = dict(top_k=8, max_seq_len=40, window=3, docs_per_shard=3, hidden_layers="0,15,30",
            long_documents="split", progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("writer") / "in.jsonl",
                       [{"text": t} for t in TEXTS] + [{"text": ""}])


def _files(out: Path) -> dict[str, str]:
    """Every file of a dataset (shards, fragment, manifest) -> sha256."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("codec", ["exact", "default"])
def test_process_writer_writes_the_bytes_the_thread_writer_writes(tmp_path, teacher_dir, data,
                                                                  codec):
    runs = {w: run_capture(CaptureOptions(model=str(teacher_dir), data=str(data),
                                          out=str(tmp_path / w), codec=codec, writer=w, **OPTS))
            for w in ("thread", "process")}
    thread, process = _files(tmp_path / "thread"), _files(tmp_path / "process")
    assert len([f for f in thread if f.startswith("shards/")]) >= 4
    assert "manifest.json" in thread and thread == process
    s = runs["process"]
    assert s.complete and s.documents == runs["thread"].documents > len(TEXTS)  # split pieces
    assert s.skipped == {"empty text": 1}
    # the teacher's process timed its forward and staging; the writer's stages came back
    assert {"forward", "stage", "write_window", "encode_topk", "parquet", "commit"} <= set(s.stages)
    assert "stage" not in runs["thread"].stages
    assert len(s.windows) == -(-(len(TEXTS) + 1) // OPTS["window"])
    assert s.tokens_in_run == s.tokens == sum(n for _, n in s.windows)


def test_a_sampled_capture_writes_the_same_bytes_with_either_writer(tmp_path, teacher_dir, data):
    """The draws (ids and counts made on the teacher's side) travel through shared memory."""
    opts = {**OPTS, "top_k": None}          # the rows' width is the codec's number of draws
    runs = {w: run_capture(CaptureOptions(model=str(teacher_dir), data=str(data),
                                          out=str(tmp_path / w), codec="sampled", writer=w,
                                          **opts))
            for w in ("thread", "process")}
    thread, process = _files(tmp_path / "thread"), _files(tmp_path / "process")
    assert len([f for f in thread if f.startswith("shards/")]) >= 4
    assert "manifest.json" in thread and thread == process
    assert runs["process"].complete and "stage" in runs["process"].stages
    assert runs["process"].documents == runs["thread"].documents > len(TEXTS)
    report = verify_dataset(str(tmp_path / "process"), deep=True)
    assert report.ok, report.problems
    doc = next(Dataset(str(tmp_path / "process")).iter_documents())
    assert doc.topk_ids.shape[1] == 0 and int(doc.sample_counts.sum(1).min()) == 32


def test_hidden_codecs_encode_into_a_tensor_the_same_bytes(tmp_path):
    x = (torch.randn(37, 64) * torch.logspace(-2, 2, 64)).to(torch.bfloat16)
    projection = fit_lowrank({3: x.float()}, 8)
    params = {"lowrank": {"rank": 8, "projection": "artifacts/p.safetensors",
                          "projection_sha256": hashlib.sha256(projection).hexdigest()}}
    for kind, cls in HIDDEN.items():
        codec = cls(params.get(kind, {}), hidden_size=64, dtype=torch.bfloat16,
                    artifacts=lambda rel: projection)
        tensor = codec.encode_tensor(x, 3)
        assert tensor.dtype == torch.uint8 and tensor.dim() == 1, kind
        assert np.array_equal(tensor.numpy(), codec.encode_array(x, 3)), kind


def test_a_refusal_in_the_writer_process_comes_back_as_itself(tmp_path, teacher_dir, data):
    out = tmp_path / "ds"
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out),
                               limit=3, writer="process", **OPTS))
    with pytest.raises(ConfigError, match="(?s)different configuration.*top_k"):
        run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out),
                                   limit=3, writer="process", **(OPTS | {"top_k": 6})))


def _cli(teacher, data, out) -> list[str]:
    return [sys.executable, "-c", "from kdpipe.cli import main; main()", "capture",
            "--model", str(teacher), "--data", str(data), "--out", str(out), "--top-k", "8",
            "--max-seq-len", "40", "--window", "1", "--docs-per-shard", "1",
            "--hidden-layers", "0,15,30", "--writer", "process", "--no-progress"]


def _writers(pid: int) -> list[int]:
    """The writer processes among ``pid``'s children."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"kdpipe.capture.writer_process" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _start_and_wait_for_a_commit(args: list[str], out: Path) -> tuple[subprocess.Popen, int]:
    """The capture and its writer process, once a window is committed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    frag = out / "parts" / "part-00000-of-00001.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if frag.exists() and json.loads(frag.read_text())["shards"]:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    writers = _writers(proc.pid)
    assert len(writers) == 1
    return proc, writers[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_writer_fails_the_capture_at_once_and_a_rerun_resumes(tmp_path, teacher_dir,
                                                                       data):
    reference = tmp_path / "ref"
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(reference),
                               **(OPTS | {"window": 1, "docs_per_shard": 1,
                                          "long_documents": "truncate"})))
    out = tmp_path / "ds"
    proc, writer = _start_and_wait_for_a_commit(_cli(teacher_dir, data, out), out)
    os.kill(writer, signal.SIGKILL)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 130, 143), stdout
    assert "writer process was killed by SIGKILL" in stderr and "resume from record" in stderr
    assert time.time() - t0 < 60            # a window or two, not a hang
    assert not (out / "manifest.json").exists()
    again = subprocess.run(_cli(teacher_dir, data, out), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "complete" in again.stdout, again.stderr
    assert _files(out) == _files(reference)


def test_a_killed_capture_leaves_its_writer_nothing_half_written(tmp_path, teacher_dir, data):
    out = tmp_path / "ds"
    proc, writer = _start_and_wait_for_a_commit(_cli(teacher_dir, data, out), out)
    proc.kill()
    proc.communicate()
    deadline = time.time() + 60
    while _alive(writer) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(writer), "the writer outlived the capture"
    listed = {s["file"]: s["sha256"] for s in
              json.loads((out / "parts" / "part-00000-of-00001.json").read_text())["shards"]}
    on_disk = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert listed and not [f for f in on_disk if Path(f).name.startswith(".tmp-")]
    for f in on_disk:     # a shard closed after the last commit is whole, and unlisted
        if f in listed:
            assert hashlib.sha256((out / f).read_bytes()).hexdigest() == listed[f]
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), top_k=8,
                               max_seq_len=40, window=1, docs_per_shard=1,
                               hidden_layers="0,15,30", progress=False))
    assert verify_dataset(str(out), deep=True).ok
