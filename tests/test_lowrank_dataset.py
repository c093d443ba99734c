"""The low-rank hidden codec through the dataset writer and reader: its projection is a
dataset artifact, written once, listed with its sha256, checked by readers and verify."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from kdpipe.compress import Dataset, PartWriter
from kdpipe.compress.cli import compress_cmd
from kdpipe.compress.codec import load_codec_config
from kdpipe.compress.fidelity import LOWRANK_ARTIFACT, resolve_lowrank
from kdpipe.compress.verify import verify_dataset
from kdpipe.schemas import (CaptureSettings, CodecConfig, ConfigError, DatasetError, Manifest,
                            TeacherDocument, TeacherInfo, hidden_column)

VOCAB, K, H, RANK = 300, 8, 32, 6
LAYERS = (0, 3)
EXACT = CodecConfig.from_dict({"name": "exact", "ids": "int32", "values": "float32",
                               "hidden": "native"})
LOWRANK = CodecConfig.from_dict({"name": "lr", "ids": "int32", "values": "float32",
                                 "hidden": {"kind": "lowrank", "rank": RANK}})
FP8_COSINE = 0.999   # what fp8 codes promise per token (tests/test_codec_components.py)


def _teacher() -> TeacherInfo:
    return TeacherInfo("t", "LlamaForCausalLM", "0" * 64, VOCAB, H, 4, "1" * 64,
                       {"bos": 1, "eos": 2, "pad": None, "unk": None}, "float32")


def _capture() -> CaptureSettings:
    return CaptureSettings("hf", K, 64, "float32", False, list(LAYERS), "text", "truncate", "x")


def _docs(n: int, seed: int = 0) -> list[TeacherDocument]:
    """Documents whose hidden states lie in a RANK-dimensional affine subspace per layer."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    spaces = {layer: (torch.linalg.qr(torch.randn(H, RANK, generator=g)).Q,
                      torch.randn(H, generator=g) * 3,
                      torch.linspace(8, 1, RANK)) for layer in LAYERS}
    docs = []
    for i in range(n):
        t = int(rng.integers(5, 30))
        ids = torch.stack([torch.from_numpy(rng.choice(VOCAB, K, replace=False))
                           for _ in range(t)]).long()
        lps = torch.sort(torch.from_numpy(rng.normal(-5, 2, (t, K)).astype(np.float32)
                                          .clip(max=0)), dim=1, descending=True).values
        hidden = {layer: (torch.randn(t, RANK, generator=g) * sig) @ basis.T + mean
                  for layer, (basis, mean, sig) in spaces.items()}
        docs.append(TeacherDocument(doc_id=f"{i:09d}", input_ids=rng.integers(0, VOCAB, t)
                                    .astype(np.int32), topk_ids=ids, topk_logprobs=lps,
                                    hidden=hidden, record_index=i))
    return docs


def _fit(docs: list[TeacherDocument]) -> tuple[CodecConfig, dict[str, bytes]]:
    return resolve_lowrank(LOWRANK, {layer: torch.cat([d.hidden[layer] for d in docs[:3]])
                                     for layer in LAYERS})


def _writer(out, codec, artifacts=None, **kw) -> PartWriter:
    kw.setdefault("index", 0)
    kw.setdefault("count", 1)
    return PartWriter(str(out), teacher=_teacher(), capture=_capture(), codec=codec,
                      docs_per_shard=3, artifacts=artifacts, **kw)


def _assert_round_trip(ds: Dataset, docs) -> None:
    """Same documents and ids; hidden states within the fp8 coefficients' error."""
    got = list(ds.iter_documents())
    assert [d.doc_id for d in got] == [d.doc_id for d in docs]
    for a, b in zip(got, docs):
        assert torch.equal(a.topk_ids, b.topk_ids)
        for layer in LAYERS:
            assert _min_cosine(a.hidden[layer], b.hidden[layer]) > FP8_COSINE


def _write(out, docs, codec, artifacts=None, **kw):
    w = _writer(out, codec, artifacts, **kw)
    for d in docs:
        w.add_record(d.record_index, [d])
        w.end_window()
    return w.finish()


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())


@pytest.fixture
def written(tmp_path):
    docs = _docs(8)
    config, artifacts = _fit(docs)
    _write(tmp_path / "ds", docs, config, artifacts)
    return tmp_path / "ds", docs, config, artifacts


def test_lowrank_dataset_round_trips(written):
    out, docs, config, artifacts = written
    data = artifacts[LOWRANK_ARTIFACT]
    assert (out / LOWRANK_ARTIFACT).read_bytes() == data
    ds = Dataset(str(out))
    assert ds.manifest.artifacts == {LOWRANK_ARTIFACT: {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    assert ds.manifest.codec == config and len(ds.shards) == 3
    _assert_round_trip(ds, docs)
    table = pq.read_table(out / ds.shards[0].file)
    assert len(table.column("hidden_003")[0].as_py()) == docs[0].num_tokens * (2 + RANK)
    report = verify_dataset(str(out), deep=True)
    assert report.ok and report.artifacts_checked == 1


def test_resumed_writer_keeps_the_artifact(tmp_path):
    docs = _docs(8, seed=1)
    config, artifacts = _fit(docs)
    out = tmp_path / "ds"
    w = _writer(out, config, artifacts)
    for d in docs[:4]:   # one shard committed, one document in progress: then a crash
        w.add_record(d.record_index, [d])
        w.end_window()
    w.abort()
    path = out / LOWRANK_ARTIFACT
    before = path.stat()
    other = resolve_lowrank(LOWRANK, {layer: torch.cat([d.hidden[layer] for d in docs[4:]])
                                      for layer in LAYERS})[1]
    with pytest.raises(ConfigError, match=LOWRANK_ARTIFACT):
        _writer(out, config, other)          # same codec, other artifact bytes
    w = _writer(out, config, artifacts)
    assert w.next_record == 3
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    w.abort()
    w = _writer(out, config)                 # resuming without the bytes: the listed file
    for d in docs[w.next_record:]:
        w.add_record(d.record_index, [d])
        w.end_window()
    assert w.finish() is not None
    got = list(Dataset(str(out)).iter_documents())
    assert len(got) == 8
    assert all(_min_cosine(a.hidden[0], b.hidden[0]) > FP8_COSINE for a, b in zip(got, docs))


def test_parts_carry_the_same_artifact(tmp_path):
    docs = _docs(6, seed=2)
    config, artifacts = _fit(docs)
    out = tmp_path / "ds"
    assert _write(out, docs[0::2], config, artifacts, index=0, count=2) is None
    # the second part is given no bytes: it takes the artifact the first part listed
    assert _write(out, docs[1::2], config, None, index=1, count=2) is not None
    frags = [json.loads(p.read_text()) for p in sorted((out / "parts").iterdir())]
    assert frags[0]["artifacts"] == frags[1]["artifacts"] != {}
    assert sorted(d.doc_id for d in Dataset(str(out)).iter_documents()) == \
        sorted(d.doc_id for d in docs)
    frag = out / "parts" / "part-00001-of-00002.json"
    bad = json.loads(frag.read_text())
    bad["artifacts"][LOWRANK_ARTIFACT]["sha256"] = "0" * 64
    frag.write_text(Manifest.from_dict(bad).to_json())  # a consistent, checksummed fragment
    (out / "manifest.json").unlink()
    with pytest.raises(DatasetError, match=f"part-00001-of-00002.json.*{LOWRANK_ARTIFACT}"):
        Dataset(str(out))


def test_tampered_or_missing_artifact_is_refused(written):
    out, _, _, _ = written
    path = out / LOWRANK_ARTIFACT
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"{LOWRANK_ARTIFACT}.*sha256"):
        list(Dataset(str(out)).iter_documents())
    report = verify_dataset(str(out))
    assert not report.ok and report.problems[0].file == LOWRANK_ARTIFACT
    assert LOWRANK_ARTIFACT in report.problems[0].message
    assert all(p.file != LOWRANK_ARTIFACT for p in report.problems[1:])  # shards are fine
    path.unlink()
    with pytest.raises(DatasetError, match=f"{LOWRANK_ARTIFACT}.*missing"):
        list(Dataset(str(out)).iter_documents())
    assert [p.file for p in verify_dataset(str(out)).problems] == [LOWRANK_ARTIFACT]


def test_artifact_paths_stay_under_artifacts(tmp_path):
    config, artifacts = _fit(_docs(3))
    for rel in ("../evil.bin", "shards/x.bin", "/abs.bin"):
        with pytest.raises(DatasetError, match="artifact|escapes"):
            _writer(tmp_path / "ds", config, {**artifacts, rel: b"x"})
    with pytest.raises(ConfigError, match="needs the dataset artifact"):
        _writer(tmp_path / "other", config)


def test_compress_exact_to_lowrank_end_to_end(tmp_path):
    docs = _docs(7, seed=3)
    src, dst = tmp_path / "exact", tmp_path / "lr"
    _write(src, docs, EXACT)
    codec_file = tmp_path / "lowrank.yaml"
    codec_file.write_text(f"name: lr\nids: int32\nvalues: float32\n"
                          f"hidden:\n  kind: lowrank\n  rank: {RANK}\n")
    args = [str(src), str(dst), "--codec", str(codec_file), "--calibration-tokens", "40"]
    result = CliRunner().invoke(compress_cmd, args)
    assert result.exit_code == 0, result.output
    assert "fitted a rank-6 projection" in result.output
    ds = Dataset(str(dst))
    assert set(ds.manifest.artifacts) == {ds.manifest.codec.hidden.params["projection"]}
    _assert_round_trip(ds, docs)
    assert verify_dataset(str(dst), deep=True).ok
    again = CliRunner().invoke(compress_cmd, args)   # rerun: the fitted projection is kept
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output and Dataset(str(dst)).manifest == ds.manifest


def test_capture_refuses_an_unfitted_lowrank_codec(tmp_path):
    from kdpipe.capture.run import CaptureOptions, run_capture

    codec_file = tmp_path / "lowrank.yaml"
    codec_file.write_text("ids: int32\nvalues: float32\nhidden: {kind: lowrank, rank: 4}\n")
    with pytest.raises(ConfigError, match="capture with --codec exact.*kdpipe compress"):
        run_capture(CaptureOptions(model="unused", data="unused", out=str(tmp_path / "o"),
                                   codec=str(codec_file)))


@pytest.mark.parametrize("zstd_hidden", [False, True], ids=["capture", "offline"])
def test_entropy_coded_columns_skip_parquet_compression(tmp_path, zstd_hidden):
    """Parquet's zstd is off for columns the codec already entropy-codes, and for the hidden
    states unless asked for (capture leaves them raw to keep up with the GPU)."""
    docs = _docs(3, seed=4)
    hidden = set() if zstd_hidden else {hidden_column(layer) for layer in LAYERS}
    for name, raw in (("default", {"topk_ids", "topk_values"}), ("exact", set())):
        _write(tmp_path / name, docs, load_codec_config(name), zstd_hidden=zstd_hidden)
        ds = Dataset(str(tmp_path / name))
        md = pq.ParquetFile(tmp_path / name / ds.shards[0].file).metadata.row_group(0)
        for i in range(md.num_columns):
            col = md.column(i)
            expected = "UNCOMPRESSED" if col.path_in_schema in raw | hidden else "ZSTD"
            assert col.compression == expected, (name, col.path_in_schema)
