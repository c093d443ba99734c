"""Crash safety, resumption, idempotence and multi-process parts of `kdpipe capture`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset
from kdpipe.compress.verify import dump_arrays, verify_dataset
from kdpipe.schemas import ConfigError
from tests.helpers import docstring_texts, write_jsonl

TEXTS = docstring_texts(24, 300)
N_DOCS = len(TEXTS)
OPTS = dict(top_k=8, max_seq_len=48, window=2, docs_per_shard=2, hidden_layers="0,30",
            progress=False)


def _cli_args(teacher_dir, data, out, **extra) -> list[str]:
    args = [sys.executable, "-c", "from kdpipe.cli import main; main()", "capture",
            "--model", str(teacher_dir), "--data", str(data), "--out", str(out), "--top-k", "8",
            "--max-seq-len", "48", "--window", "2", "--docs-per-shard", "2",
            "--hidden-layers", "0,30", "--no-progress"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return write_jsonl(tmp / "in.jsonl", [{"text": t} for t in TEXTS])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir, data):
    out = tmp_path_factory.mktemp("full") / "ds"
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), **OPTS))
    return out


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, teacher_dir, data, uninterrupted,
                                                 writer):
    out = tmp_path / "ds"
    proc = subprocess.Popen(_cli_args(teacher_dir, data, out, writer=writer),
                            stderr=subprocess.DEVNULL)
    frag = out / "parts" / "part-00000-of-00001.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if frag.exists() and json.loads(frag.read_text())["shards"]:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(frag.read_text())
    assert not state["parts"][0]["complete"], "capture finished before it could be killed"
    assert not (out / "manifest.json").exists()
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), **OPTS))
    _assert_same_arrays(dump_arrays(str(uninterrupted)), dump_arrays(str(out)))
    a, b = Dataset(str(uninterrupted)).manifest, Dataset(str(out)).manifest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.records == b.records and b.records.read == N_DOCS
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigterm_stops_gracefully_and_resumes(tmp_path, teacher_dir, data, uninterrupted, writer):
    out = tmp_path / "ds"
    proc = subprocess.Popen(_cli_args(teacher_dir, data, out, writer=writer),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    frag = out / "parts" / "part-00000-of-00001.json"
    while proc.poll() is None and not frag.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, stdout
    assert "rerun the same command to resume" in stdout
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), **OPTS))
    _assert_same_arrays(dump_arrays(str(uninterrupted)), dump_arrays(str(out)))


def test_rerun_of_finished_capture_does_nothing(teacher_dir, data, uninterrupted):
    before = (uninterrupted / "manifest.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (uninterrupted / "shards").iterdir()}
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(uninterrupted),
                               **OPTS))
    assert (uninterrupted / "manifest.json").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in (uninterrupted / "shards").iterdir()} == mtimes


def test_changed_configuration_is_refused(teacher_dir, data, uninterrupted):
    opts = dict(OPTS, top_k=4)
    with pytest.raises(ConfigError, match="top_k"):
        run_capture(CaptureOptions(model=str(teacher_dir), data=str(data),
                                   out=str(uninterrupted), **opts))


def test_two_concurrent_parts_make_one_dataset(tmp_path, teacher_dir, data, uninterrupted):
    out = tmp_path / "ds"
    procs = [subprocess.Popen(_cli_args(teacher_dir, data, out, num_shards=2, shard_index=i),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert (out / "manifest.json").exists()
    assert verify_dataset(str(out), deep=True).ok
    whole = {d.doc_id: d for d in Dataset(str(uninterrupted)).iter_documents()}
    union = {d.doc_id: d for d in Dataset(str(out)).iter_documents()}
    assert sorted(whole) == sorted(union) and len(union) == N_DOCS
    for key, doc in union.items():
        ref = whole[key]
        assert np.array_equal(doc.input_ids, ref.input_ids)
        # other batch companions: float noise only
        np.testing.assert_allclose(doc.topk_logprobs, ref.topk_logprobs, atol=1e-5, rtol=1e-5)
    m = Dataset(str(out)).manifest
    assert m.records.read == N_DOCS and [p.index for p in m.parts] == [0, 1]
