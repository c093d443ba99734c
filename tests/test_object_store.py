"""Datasets on S3: a real S3-compatible server (moto in server mode) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset
from kdpipe.compress.verify import verify_dataset
from kdpipe.compress import Storage
from tests.helpers import docstring_texts, write_jsonl
from tests.test_dataset_io import _doc, _write

BUCKET = "kdpipe-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    deadline = time.time() + 30
    while True:
        try:
            fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
            fs.create_dir(BUCKET)
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    yield query
    proc.terminate()
    proc.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_round_trip_and_verify_on_s3(s3_endpoint):
    uri = f"s3://{BUCKET}/synthetic?{s3_endpoint}"
    rng = np.random.default_rng(3)
    docs = [_doc(i, rng) for i in range(9)]
    _write(uri, docs)
    ds = Dataset(uri)
    got = list(ds.iter_documents())
    assert [d.doc_id for d in got] == [d.doc_id for d in docs]
    assert all(torch.equal(a.topk_logprobs, b.topk_logprobs) for a, b in zip(got, docs))
    assert verify_dataset(uri, deep=True).ok
    assert ds.storage.describe(ds.shards[0].file).startswith(f"s3://{BUCKET}/synthetic/shards/")


def test_failed_upload_leaves_no_object(s3_endpoint):
    storage = Storage(f"s3://{BUCKET}/atomic?{s3_endpoint}")
    with pytest.raises(RuntimeError):
        with storage.atomic_output("shards/x.parquet") as out:
            out.write(b"half a shard")
            raise RuntimeError("killed mid-write")
    assert storage.listdir("shards") == []


def test_capture_writes_to_s3(s3_endpoint, teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docstring_texts(3, 200)])
    uri = f"s3://{BUCKET}/capture?{s3_endpoint}"
    s = run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=uri, top_k=4,
                                   max_seq_len=32, progress=False))
    assert s.complete and s.documents == 3
    report = verify_dataset(uri, deep=True)
    assert report.ok and report.documents_checked == 3
