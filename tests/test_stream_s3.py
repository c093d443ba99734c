"""Streaming from object storage: the same micro-batches from an S3 dataset (a moto server on
loopback) as from the same dataset on disk, through DataLoader workers, and a short
training run reading from S3."""

from __future__ import annotations

import torch

from kdpipe.compress import Dataset
from kdpipe.student_train.stream_loader import DistillStream, build_index, make_loader
from test_train_fixtures import LAYERS, tiny_config, write_dataset, write_student
from tests.test_object_store import BUCKET, s3_endpoint  # noqa: F401  (fixture)


def _stream(uri: str) -> DistillStream:
    return DistillStream(uri, build_index(Dataset(uri)), seq_len=32, packing="whole",
                         shuffle=True, shuffle_block=2, streams=2, seed=3, micro_batch=2,
                         hidden_layers=list(LAYERS))


def test_s3_stream_equals_local(s3_endpoint, tmp_path):  # noqa: F811
    uri = f"s3://{BUCKET}/stream?{s3_endpoint}"
    write_dataset(uri, n_docs=16, teacher_mask_every=3)
    write_dataset(tmp_path / "local", n_docs=16, teacher_mask_every=3)
    remote = list(make_loader(_stream(uri), workers=2, pin_memory=False))
    local = list(_stream(str(tmp_path / "local")))
    assert len(remote) == len(local) > 0
    for a, b in zip(remote, local):
        assert a.doc_ids == b.doc_ids and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.topk_logprobs, b.topk_logprobs)
        assert all(torch.equal(a.hidden[x], b.hidden[x]) for x in LAYERS)


def test_training_reads_from_s3(s3_endpoint, tmp_path):  # noqa: F811
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer
    uri = f"s3://{BUCKET}/train?{s3_endpoint}"
    write_dataset(uri, n_docs=10)
    student = write_student(tmp_path / "student")
    cfg = load_config(None, tiny_config(tmp_path, uri, student, heldout=uri,
                                        **{"train.max_steps": 2}))
    result = Trainer(cfg).train()
    assert result["step"] == 2 and result["eval"]["rows"] > 0
