"""Part writer and reader: exact round trip, atomicity, corruption and mislabelling."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe.compress import Dataset, PartWriter
from kdpipe.compress.verify import dump_arrays, verify_dataset
from kdpipe.schemas import (CaptureSettings, CodecConfig, CodecMismatchError, DatasetError,
                            Manifest, TeacherDocument, TeacherInfo)

VOCAB, K, H = 500, 6, 8
EXACT = CodecConfig.from_dict({"name": "exact", "ids": "int32", "values": "float32",
                               "hidden": "native"})


def _teacher() -> TeacherInfo:
    return TeacherInfo("t", "LlamaForCausalLM", "0" * 64, VOCAB, H, 4, "1" * 64,
                       {"bos": 1, "eos": 2, "pad": None, "unk": None}, "bfloat16")


def _capture(layers=(0, 4)) -> CaptureSettings:
    return CaptureSettings("hf", K, 64, "bfloat16", True, list(layers), "text", "truncate", "x")


def _doc(i: int, rng: np.random.Generator) -> TeacherDocument:
    T = int(rng.integers(1, 40))
    tmask = None if i % 3 else rng.random(T) < 0.7
    n = T if tmask is None else int(tmask.sum())
    ids = torch.stack([torch.from_numpy(rng.choice(VOCAB, K, replace=False)) for _ in range(n)]) \
        if n else torch.empty(0, K, dtype=torch.long)
    lps = torch.sort(torch.from_numpy(rng.normal(-5, 2, (n, K)).astype(np.float32).clip(max=0)),
                     dim=1, descending=True).values
    return TeacherDocument(
        doc_id=f"{i:09d}-x", input_ids=rng.integers(0, VOCAB, T).astype(np.int32),
        topk_ids=ids.long(), topk_logprobs=lps, teacher_mask=tmask,
        loss_mask=None if i % 2 else rng.random(T) < 0.5,
        hidden={0: torch.randn(T, H).bfloat16(), 4: torch.randn(T, H).bfloat16()},
        record_index=i)


def _write(out, docs, **kw) -> None:
    w = PartWriter(str(out), teacher=_teacher(), capture=_capture(), codec=EXACT, index=0,
                   count=1, docs_per_shard=5, **kw)
    for d in docs:
        w.add_record(d.record_index, [d])
        w.end_window()
    w.finish()


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    docs = [_doc(i, rng) for i in range(17)]
    _write(tmp_path / "ds", docs, row_group_bytes=2000)
    return tmp_path / "ds", docs


def test_round_trip_is_exact(written):
    out, docs = written
    ds = Dataset(str(out))
    assert len(ds.shards) == 4 and ds.manifest.complete
    got = list(ds.iter_documents())
    assert [d.doc_id for d in got] == [d.doc_id for d in docs]
    for a, b in zip(got, docs):
        assert np.array_equal(a.input_ids, b.input_ids)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs,
                                                                    b.topk_logprobs)
        for layer in (0, 4):
            assert torch.equal(a.hidden[layer], b.hidden[layer].float())
        for x, y in ((a.teacher_mask, b.teacher_mask), (a.loss_mask, b.loss_mask)):
            assert (x is None and y is None) or np.array_equal(x, y)
    arrays = dump_arrays(str(out), limit=1)
    d0 = docs[0]
    assert arrays[f"{d0.doc_id}/topk_ids"].shape == (d0.num_tokens, K)
    assert (arrays[f"{d0.doc_id}/topk_ids"][~d0.teacher_mask] == -1).all()
    assert verify_dataset(str(out), deep=True).ok


def test_every_single_byte_flip_is_detected(written):
    out, _ = written
    shard = out / Dataset(str(out)).shards[1].file
    data = bytearray(shard.read_bytes())
    rng = random.Random(0)
    for _ in range(25):
        pos = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(flipped))
        report = verify_dataset(str(out))
        assert not report.ok and report.problems[0].file == Dataset(str(out)).shards[1].file
    shard.write_bytes(bytes(data))
    assert verify_dataset(str(out)).ok


def test_truncated_shard_is_refused_by_readers(written):
    out, _ = written
    entry = Dataset(str(out)).shards[0]
    path = out / entry.file
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=f"{entry.file}.*truncated"):
        list(Dataset(str(out)).iter_documents())


def test_corrupt_manifest_names_the_file(written):
    out, _ = written
    (out / "manifest.json").write_text('{"format": "kdpipe-dataset", "format_version": "2.0"')
    with pytest.raises(DatasetError, match="manifest.json.*JSON"):
        Dataset(str(out))


def test_mislabelled_shard_codec_is_refused(written):
    out, _ = written
    entry = Dataset(str(out)).shards[0]
    path = out / entry.file
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    other = dict(json.loads(meta[b"kdpipe.codec"]), top_k=3)
    meta[b"kdpipe.codec"] = json.dumps(other).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["bytes"] = path.stat().st_size  # an honest size: only the codec lies
    (out / "manifest.json").write_text(Manifest.from_dict(m).to_json())
    with pytest.raises(CodecMismatchError, match=entry.file):
        list(Dataset(str(out)).iter_documents())


def test_killed_writer_leaves_nothing_visible(tmp_path):
    rng = np.random.default_rng(1)
    w = PartWriter(str(tmp_path / "ds"), teacher=_teacher(), capture=_capture(), codec=EXACT,
                   index=0, count=1, docs_per_shard=100, row_group_bytes=100)
    for i in range(5):
        w.add_record(i, [_doc(i, rng)])
    w.end_window()   # row groups written, the shard (100 documents) not yet full
    # a crash now: a temporary file exists, no shard is listed, no manifest exists
    shards = list((tmp_path / "ds" / "shards").iterdir())
    assert shards and all(p.name.startswith(".tmp-") for p in shards)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="no manifest.json and no part fragments"):
        Dataset(str(tmp_path / "ds"))
    w2 = PartWriter(str(tmp_path / "ds"), teacher=_teacher(), capture=_capture(), codec=EXACT,
                    index=0, count=1)
    assert w2.next_record == 0 and not list((tmp_path / "ds" / "shards").iterdir())
    w.abort()  # release the dead writer's handles


def test_missing_hidden_layer_request_names_layers(written):
    out, _ = written
    with pytest.raises(DatasetError, match=r"hidden layers \[7\] were not captured"):
        Dataset(str(out)).columns([7])


def test_writer_block_commits_on_exit_and_aborts_on_an_exception(tmp_path):
    """Leaving the block commits what was added; an exception drops what was not committed
    (only whole, listed shards remain); either way the writer's threads are shut down."""
    rng = np.random.default_rng(2)
    docs = [_doc(i, rng) for i in range(6)]
    out = tmp_path / "ds"
    kw = dict(teacher=_teacher(), capture=_capture(), codec=EXACT, index=0, count=1,
              docs_per_shard=2, row_group_bytes=100)
    with PartWriter(str(out), **kw) as w:
        for d in docs[:3]:
            w.add_record(d.record_index, [d])   # no end_window: the exit commits them
    assert w._encoder._shutdown and w._io._shutdown
    committed = sorted(p.name for p in (out / "shards").iterdir())
    assert len(committed) == 2 and PartWriter(str(out), **kw).next_record == 3
    with pytest.raises(RuntimeError, match="stop"):
        with PartWriter(str(out), **kw) as w:
            for d in docs[3:]:
                w.add_record(d.record_index, [d])
            raise RuntimeError("stop")
    assert w._encoder._shutdown and w._io._shutdown
    assert sorted(p.name for p in (out / "shards").iterdir()) == committed
    with PartWriter(str(out), **kw) as w:
        assert w.next_record == 3
        for d in docs[3:]:
            w.add_record(d.record_index, [d])
        w.finish()
    assert [d.doc_id for d in Dataset(str(out)).iter_documents()] == [d.doc_id for d in docs]
