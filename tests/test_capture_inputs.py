"""Input readers, sharding of records, and exact top-k."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe.capture.backends import parse_hidden_layers
from kdpipe.capture.inputs import BadRecord, iter_part, iter_records
from kdpipe.capture.topk import topk_logprobs
from kdpipe.schemas import ConfigError
from tests.helpers import assert_exact_topk, tied_logits

RECS = [{"text": f"document number {i}"} for i in range(7)]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECS[:3]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(RECS[3:5]))
    pq.write_table(pa.Table.from_pylist(RECS[5:6]), tmp_path / "c.parquet")
    pacsv.write_csv(pa.Table.from_pylist(RECS[6:]), tmp_path / "d.csv")
    return tmp_path


def test_directory_of_every_format_in_order(sources):
    assert [r["text"] for r in iter_records(str(sources))] == [r["text"] for r in RECS]


def test_saved_datasets_dataset(tmp_path):
    import datasets
    datasets.Dataset.from_list(RECS).save_to_disk(str(tmp_path / "hf"))
    assert [r["text"] for r in iter_records(str(tmp_path / "hf"))] == [r["text"] for r in RECS]


def test_parts_are_disjoint_and_cover(sources):
    parts = [[i for i, _ in iter_part(str(sources), text_field="text", num_parts=3, part=p)]
             for p in range(3)]
    assert sorted(sum(parts, [])) == list(range(7))
    assert all(i % 3 == p for p, idx in enumerate(parts) for i in idx)
    resumed = [i for i, _ in iter_part(str(sources), text_field="text", num_parts=3, part=1,
                                       start=4)]
    assert resumed == [4]


def test_bad_lines_become_bad_records(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{broken\n\xff\xfe\n[1, 2]\n')
    recs = list(iter_records(str(f)))
    assert recs[0] == {"text": "ok"}
    assert [r.reason for r in recs[1:]] == ["malformed json", "undecodable bytes",
                                            "record is not an object"]
    assert all(isinstance(r, BadRecord) for r in recs[1:])


def test_wrong_text_field_and_missing_file_fail_clearly(sources, tmp_path):
    with pytest.raises(ConfigError, match="'body'.*fields seen: \\['text'\\]"):
        list(iter_part(str(sources), text_field="body", num_parts=1, part=0))
    with pytest.raises(ConfigError, match="no such file"):
        list(iter_records(str(tmp_path / "missing.jsonl")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="bad.parquet"):
        list(iter_records(str(tmp_path / "bad.parquet")))


def test_hidden_layer_spec():
    assert parse_hidden_layers("none", 30) == []
    assert parse_hidden_layers("all", 3) == [0, 1, 2, 3]
    assert parse_hidden_layers("30,0,15", 30) == [0, 15, 30]
    with pytest.raises(ConfigError, match="0..30"):
        parse_hidden_layers("31", 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab,k,rows", [
    (1000, 32, 257), (50, 50, 257), (300, 1, 257), (20000, 128, 257), (9000, 5, 257),
    (64 * 128, 128, 257), (64 * 129, 128, 257), (64 * 129 + 1, 128, 257), (128004, 128, 257),
    (70000, 1025, 220)])      # 1025 groups' candidates: more positions than 16 bits hold
def test_topk_is_exact_with_ties_by_id(vocab, k, rows, dtype):
    x = tied_logits(rows, vocab, dtype, seed=vocab + k)
    assert_exact_topk(x, *topk_logprobs(x, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_is_the_same_for_every_group_size(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 5000, generator=g) * 2
    x[:20] = torch.randint(0, 3, (20, 5000), generator=g).float()   # massive ties
    x = x.to(dtype)
    want = topk_logprobs(x, 40)
    for group in (1, 2, 16, 32, 128, 256, 8192):
        ids, lp = topk_logprobs(x, 40, group=group)
        assert torch.equal(ids, want[0]) and torch.equal(lp, want[1]), group
    with pytest.raises(ValueError, match="power of two"):
        topk_logprobs(x, 40, group=48)
