"""The codec facade and presets through the dataset writer and reader; refusals."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdpipe.compress import (Codec, Dataset, PartWriter, load_codec_config, preset_names,
                             sampling_of)
from kdpipe.compress.codec import _rank_sort_torch, rank_sort, rank_sort_ordinals
from kdpipe.compress.codecs import grid
from kdpipe.schemas import (CaptureSettings, CodecConfig, CodecError, CodecMismatchError, ConfigError,
                            DatasetError, TeacherDocument, TeacherInfo)

VOCAB, K, H, LAYERS = 5000, 128, 48, (0, 3)
PRESETS = ["exact", "default", "small", "distillkit-recommended", "distillkit-budget"]


def topk_rows(n: int, k: int, seed: int, vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * (torch.rand(n, 1, generator=g) * 6 + 0.6)
    vals, ids = torch.topk(torch.log_softmax(logits, -1), k, dim=-1)
    return ids.numpy(), vals.numpy()


def make_documents(n_docs: int, seed: int = 0, k: int = K) -> list[TeacherDocument]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        t = int(rng.integers(1, 60))
        tmask = None if i % 3 else rng.random(t) < 0.8
        n = t if tmask is None else int(tmask.sum())
        ids, lps = topk_rows(n, k, seed * 1000 + i)
        docs.append(TeacherDocument(
            doc_id=f"{i:09d}", input_ids=rng.integers(0, VOCAB, t).astype(np.int32),
            topk_ids=torch.from_numpy(ids), topk_logprobs=torch.from_numpy(lps),
            loss_mask=None if i % 2 else rng.random(t) < 0.6, teacher_mask=tmask,
            hidden={layer: torch.randn(t, H) * (1 + 30 * (torch.arange(H) == 5))
                    for layer in LAYERS},
            record_index=i))
    return docs


def write_dataset(path, docs: list[TeacherDocument], codec: CodecConfig | str = "exact",
                  k: int = K) -> str:
    config = load_codec_config(codec) if isinstance(codec, str) else codec
    teacher = TeacherInfo("synthetic", "LlamaForCausalLM", "0" * 64, VOCAB, H, 4, "1" * 64,
                          {"bos": 1, "eos": 2, "pad": None, "unk": None}, "float32")
    capture = CaptureSettings("hf", k, 64, "float32", False, list(LAYERS), "text",
                              "truncate", "synthetic")
    writer = PartWriter(str(path), teacher=teacher, capture=capture, codec=config, index=0,
                        count=1, docs_per_shard=4)
    for doc in docs:
        writer.add_record(doc.record_index, [doc])
        writer.end_window()
    writer.finish()
    return str(path)


def test_every_preset_loads_and_the_required_ones_exist():
    assert set(PRESETS) <= set(preset_names())
    for name in preset_names():
        config = load_codec_config(name)
        sampling = sampling_of(config)   # a sampled codec's rows are its draws wide
        Codec(config, vocab_size=VOCAB, top_k=sampling[0] if sampling else 128, hidden_size=H,
              hidden_dtype="float32")


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_round_trip_through_a_dataset(tmp_path, preset):
    docs = make_documents(9, seed=1)
    ds = Dataset(write_dataset(tmp_path / preset, docs, preset))
    out = list(ds.iter_documents())
    assert [d.doc_id for d in out] == [d.doc_id for d in docs]
    k = ds.codec.k
    for a, b in zip(docs, out):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        got_ids, want_ids = b.topk_ids.numpy(), a.topk_ids.numpy()[:, :k]
        if preset == "exact":
            np.testing.assert_array_equal(got_ids, want_ids)
            np.testing.assert_array_equal(b.topk_logprobs.numpy(), a.topk_logprobs.numpy())
            for layer in LAYERS:
                assert torch.equal(b.hidden[layer], a.hidden[layer])
            continue
        # ids are lossless for every preset (as sets; lossy values may reorder near-ties)
        np.testing.assert_array_equal(np.sort(got_ids, 1), np.sort(want_ids, 1))
        lps = b.topk_logprobs.numpy()
        assert (np.diff(lps, axis=1) <= 0).all() or preset.startswith("distillkit")
        for layer in LAYERS:
            cos = torch.nn.functional.cosine_similarity(b.hidden[layer], a.hidden[layer], dim=1)
            assert cos.min() > 0.998


@pytest.mark.parametrize("preset", PRESETS)
def test_an_empty_batch_decodes_to_empty_tensors(preset):
    codec = Codec(load_codec_config(preset), vocab_size=VOCAB, top_k=K, hidden_size=H,
                  hidden_dtype="float32")
    ids, lps, tail = codec.decode_rows_with_tail([], [], [])
    assert ids.shape == lps.shape == (0, codec.k) and tail.shape == (0,)


def test_rank_sort_orders_by_value_then_id():
    ids = torch.tensor([[7, 3, 9, 1, 4], [2, 8, 6, 5, 0]])
    lps = torch.tensor([[-1.0, -0.5, -1.0, float("-inf"), -0.0],
                        [-2.0, -2.0, -2.0, -1e-30, -3.0]])
    got_ids, got_lps = rank_sort(ids, lps)
    for row in range(2):
        want = sorted(zip(lps[row].tolist(), ids[row].tolist()), key=lambda p: (-p[0], p[1]))
        assert got_ids[row].tolist() == [i for _, i in want]
        assert got_lps[row].tolist() == [v for v, _ in want]
    assert got_ids.dtype == torch.int64 and got_lps.dtype == torch.float32
    # the torch path (GPUs) agrees with the numpy path (CPU), on rows with many ties too
    big_ids, big_lps = topk_rows(300, 128, seed=9)
    big_lps = np.round(big_lps, 1)
    for a, b in zip(rank_sort(torch.from_numpy(big_ids), torch.from_numpy(big_lps)),
                    _rank_sort_torch(torch.from_numpy(big_ids), torch.from_numpy(big_lps))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("vocab", [VOCAB, 1 << 24])   # int32 keys; int64 keys
def test_rank_sort_of_ordinals_matches_sorting_the_values(vocab):
    rng = np.random.default_rng(11)
    levels = torch.from_numpy(-np.cumsum(rng.random(600) + 1e-3).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, vocab, (50, 128)).astype(np.int32))
    ordinals = torch.from_numpy(rng.integers(0, 600, (50, 128)).astype(np.int32))  # ties
    want = rank_sort(ids.long(), levels[ordinals.long()])
    for ids_in in (ids, ids.long()):
        got = rank_sort_ordinals(ids_in, ordinals, levels, vocab)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("step", [0.05, 1e-5])  # rank ordinals; a grid too fine for them
def test_log_grid_with_id_set_ids_decodes_in_rank_order(step):
    config = CodecConfig.from_dict({"name": "g", "ids": "gaps", "hidden": "native",
                                    "values": {"kind": "grid", "transform": "log",
                                               "step": step}})
    codec = Codec(config, vocab_size=VOCAB, top_k=K, hidden_size=H, hidden_dtype="float32")
    assert (codec.values.ordinal_levels is None) == (step < 1e-3)
    ids, lps = topk_rows(100, K, seed=12)
    blob_ids, blob_vals = codec.encode_rows(ids, lps)
    got = codec.decode_rows([blob_ids], [blob_vals], [100])
    quantized = (grid.quantize(lps, "log", step) * -step).astype(np.float32)
    want = rank_sort(torch.from_numpy(ids).long(), torch.from_numpy(quantized))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("ids_spec, values_spec", [
    ("gaps", {"kind": "grid", "transform": "sqrt", "step": 0.0019}),
    ({"kind": "gaps", "dictionary": False}, {"kind": "grid", "transform": "sqrt", "step": 0.01}),
    ("gaps", {"kind": "grid", "transform": "log", "step": 0.05, "delta": True}),
])
def test_grid_indices_carried_through_the_id_sort_equal_permuting_the_values(ids_spec,
                                                                            values_spec):
    config = CodecConfig.from_dict({"name": "c", "ids": ids_spec, "values": values_spec,
                                    "hidden": "native", "top_k": 100})
    codec = Codec(config, vocab_size=VOCAB, top_k=K, hidden_size=H, hidden_dtype="float32")
    ids, lps = topk_rows(80, K, seed=21)
    got = codec.encode_rows(ids, lps)
    ids_b, perm = codec.ids.encode_ordered(ids[:, :100].astype(np.int64))
    want = (ids_b, codec.values.encode(np.take_along_axis(lps[:, :100], perm, 1)))
    assert got == want


@pytest.mark.parametrize("transform, step", [("log", 0.12207776353537204), ("log", 0.05),
                                             ("sqrt", 0.0019), ("sqrt", 1 / 2048.5)])
def test_grid_edges_keep_ids_exact(transform, step):
    """-inf and p = 1 land on the grid's top index, whose rounding must not step past it
    (that extra bit would spill from the carried index into the id)."""
    config = CodecConfig.from_dict({"name": "g", "ids": "gaps", "hidden": "native",
                                    "values": {"kind": "grid", "transform": transform,
                                               "step": step}})
    codec = Codec(config, vocab_size=VOCAB, top_k=4, hidden_size=H, hidden_dtype="float32")
    ids = np.array([[40, 30, 20, 10], [41, 31, 21, 11], [7, 8, 9, 6]])
    lps = np.array([[0, -1, -2, -np.inf], [0, -1, -2, -3], [0, -np.inf, -np.inf, -np.inf]],
                   np.float32)
    out_ids, out_lps = codec.decode_rows(*[[b] for b in codec.encode_rows(ids, lps)], [3])
    assert [sorted(r) for r in out_ids.tolist()] == [sorted(r) for r in ids.tolist()]
    assert out_ids[:, 0].tolist() == ids[:, 0].tolist()   # p = 1 stays first
    assert (out_lps[:, 1:] <= out_lps[:, :-1]).all()


def test_facade_keeps_rank_order_and_tail_mass():
    ids, lps = topk_rows(200, 128, seed=3)
    codec = Codec(load_codec_config("default"), vocab_size=VOCAB, top_k=128, hidden_size=H,
                  hidden_dtype="float32")
    blob_ids, blob_vals = codec.encode_rows(ids, lps)
    out_ids, out_lps, tail = codec.decode_rows_with_tail([blob_ids], [blob_vals], [200])
    out_ids2, out_lps2 = codec.decode_rows([blob_ids], [blob_vals], [200])
    assert torch.equal(out_ids, out_ids2) and torch.equal(out_lps, out_lps2)
    assert (out_lps[:, 1:] <= out_lps[:, :-1]).all()
    mass = 1 - np.exp(lps.astype(np.float64)).sum(1)
    assert np.abs(np.sqrt(tail.numpy()) - np.sqrt(mass)).max() <= 0.55 * 0.0019 + 1e-6


def test_decoding_with_another_codec_is_refused(tmp_path):
    path = write_dataset(tmp_path / "d", make_documents(3), "default")
    shard = sorted((tmp_path / "d" / "shards").iterdir())[0]
    table = pq.read_table(shard)
    other = Codec(CodecConfig.from_dict({"ids": "gaps", "values": {
        "kind": "grid", "transform": "sqrt", "step": 0.004}, "hidden": "fp8"}),
        vocab_size=VOCAB, top_k=K, hidden_size=H, hidden_dtype="float32")
    rows = [int(n) for n in table.column("num_tokens").to_numpy()]
    masks = table.column("teacher_mask").to_pylist()
    rows = [n if m is None else sum(m) for n, m in zip(rows, masks)]
    with pytest.raises(CodecMismatchError):
        other.decode_rows(table.column("topk_ids").to_pylist(),
                          table.column("topk_values").to_pylist(), rows)
    # and at the dataset level: a shard whose metadata names another codec
    meta = dict(table.schema.metadata)
    meta[b"kdpipe.codec"] = other.config.to_json().encode()
    pq.write_table(table.replace_schema_metadata(meta), shard)
    ds = Dataset(path)
    with pytest.raises((CodecMismatchError, DatasetError)):
        list(ds.iter_documents())


@pytest.mark.parametrize("preset", ["default", "distillkit-recommended"])
def test_corrupt_or_truncated_blobs_are_refused(preset):
    ids, lps = topk_rows(50, 128, seed=4)
    codec = Codec(load_codec_config(preset), vocab_size=VOCAB, top_k=128, hidden_size=H,
                  hidden_dtype="float32")
    blob_ids, blob_vals = codec.encode_rows(ids, lps)
    for bad_ids, bad_vals in [(blob_ids[:-1], blob_vals), (blob_ids, blob_vals[:-2]),
                              (blob_ids + b"\0", blob_vals)]:
        with pytest.raises(CodecError):
            codec.decode_rows([bad_ids], [bad_vals], [50])
    with pytest.raises(CodecError):   # a wrong row count is a wrong length too
        codec.decode_rows([blob_ids], [blob_vals], [49])
    if preset == "default":           # checksummed: any flipped bit is caught
        flipped = bytearray(blob_vals)
        flipped[len(flipped) // 2] ^= 0x10
        with pytest.raises(CodecError, match="checksum"):
            codec.decode_rows([blob_ids], [bytes(flipped)], [50])


def test_vocabulary_and_id_range_refusals():
    ids, lps = topk_rows(5, 64, seed=5)
    for preset in ("default", "exact", "distillkit-budget"):
        codec = Codec(load_codec_config(preset), vocab_size=VOCAB, top_k=64, hidden_size=H,
                      hidden_dtype="float32")
        bad = ids.copy()
        bad[2, 3] = VOCAB
        with pytest.raises(CodecError, match="outside the vocabulary"):
            codec.encode_rows(bad, lps)
        small = Codec(load_codec_config(preset), vocab_size=int(ids[:, :codec.k].max()),
                      top_k=64, hidden_size=H, hidden_dtype="float32")
        with pytest.raises(CodecError, match="outside the vocabulary"):
            small.decode_rows(*([b] for b in codec.encode_rows(ids, lps)), [5])
    with pytest.raises(ConfigError, match="vocabulary"):
        Codec(CodecConfig.from_dict({"ids": {"kind": "packed", "bits": 12}, "values": "float32",
                                     "hidden": "native"}),
              vocab_size=VOCAB, top_k=16, hidden_size=H, hidden_dtype="float32")
    with pytest.raises(ConfigError, match="top_k"):
        Codec(load_codec_config("distillkit-recommended"), vocab_size=VOCAB, top_k=100,
              hidden_size=H, hidden_dtype="float32")


def test_codec_files_and_unknown_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"ids": "gaps", "values": {"kind": "grid", "transform": "log", '
                    '"step": 0.05, "delta": true}, "hidden": "int8", "top_k": 32}')
    config = load_codec_config(str(path))
    assert config.name == "mine" and config.top_k == 32
    with pytest.raises(ConfigError):
        load_codec_config("no-such-preset")
    with pytest.raises(ConfigError, match="unknown"):
        Codec(CodecConfig.from_dict({"ids": "gaps", "values": "zip", "hidden": "native"}),
              vocab_size=VOCAB, top_k=8, hidden_size=H, hidden_dtype="float32")


def test_compress_command_reencodes_and_resumes(tmp_path):
    from click.testing import CliRunner

    from kdpipe.compress.cli import compress_cmd

    docs = make_documents(7, seed=6)
    src = write_dataset(tmp_path / "exact", docs)
    runner = CliRunner()
    for codec in ("default", "default"):   # the second run finds the work done
        result = runner.invoke(compress_cmd, [src, str(tmp_path / "small"), "--codec", codec])
        assert result.exit_code == 0, result.output
    ds = Dataset(str(tmp_path / "small"))
    assert ds.manifest.codec.name == "default" and ds.manifest.documents == 7
    back = runner.invoke(compress_cmd, [str(tmp_path / "small"), str(tmp_path / "again"),
                                        "--codec", "exact"])
    assert back.exit_code == 0, back.output
    for a, b in zip(ds.iter_documents(), Dataset(str(tmp_path / "again")).iter_documents()):
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs,
                                                                     b.topk_logprobs)


@pytest.mark.parametrize("preset", ["default", "distillkit-recommended"])
def test_a_flipped_byte_in_coded_columns_never_decodes_silently(tmp_path, preset):
    import random

    path = write_dataset(tmp_path / "d", make_documents(4, seed=10), preset)
    shard = sorted((tmp_path / "d" / "shards").iterdir())[0]
    data = shard.read_bytes()
    meta = pq.ParquetFile(shard).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    spans = []
    for column in ("topk_ids", "topk_values"):
        chunk = meta.row_group(0).column(names.index(column))
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        spans.append((start, start + chunk.total_compressed_size))
    rng = random.Random(1)
    for _ in range(12):
        start, end = rng.choice(spans)
        pos = rng.randrange(start, end)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(flipped))
        with pytest.raises(DatasetError):
            list(Dataset(path).iter_documents())
    shard.write_bytes(data)
    assert len(list(Dataset(path).iter_documents())) == 4


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=4), st.sampled_from(PRESETS))
def test_any_batch_shape_round_trips(sizes, preset):
    codec = Codec(load_codec_config(preset), vocab_size=VOCAB, top_k=K, hidden_size=H,
                  hidden_dtype="float32")
    docs = [topk_rows(n, K, seed=n * 7 + i) for i, n in enumerate(sizes)]
    blobs = [codec.encode_rows(i, v) for i, v in docs]
    ids, lps = codec.decode_rows([b[0] for b in blobs], [b[1] for b in blobs], sizes)
    want = np.concatenate([i[:, :codec.k] for i, _ in docs])
    assert ids.shape == lps.shape == (sum(sizes), codec.k)
    np.testing.assert_array_equal(np.sort(ids.numpy(), 1), np.sort(want, 1))
    x = torch.randn(sum(sizes), H)
    hidden = codec.decode_hidden([codec.encode_hidden(x[:n]) for n in (sum(sizes),)],
                                 [sum(sizes)])
    assert hidden.shape == x.shape
