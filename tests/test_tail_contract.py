"""The stored missing mass (tail) through the contract: encode -> shard -> decode gives back
exactly what the codec stored, packing hands it to the loss, and codecs that store none
leave ``tail_mass`` None and have the tail recomputed from the decoded top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.compress import Dataset, load_codec_config
from kdpipe.compress.codecs import grid
from kdpipe.compress.verify import dump_arrays, verify_dataset
from kdpipe.schemas import CodecConfig
from kdpipe.student_train.packing import assemble, missing_mass
from kdpipe.student_train.stream_loader import DistillStream, build_index
from test_codec_facade import make_documents, write_dataset


def _no_tail_default() -> CodecConfig:
    d = load_codec_config("default").to_dict() | {"name": "default-no-tail"}
    d["values"] = dict(d["values"], tail_mass=False)
    return CodecConfig.from_dict(d)


@pytest.fixture(scope="module")
def docs():
    return make_documents(10, seed=3)


@pytest.mark.parametrize("preset", ["default", "small"])
def test_stored_tail_round_trips_exactly(tmp_path, docs, preset):
    """What the decoder returns is bit for bit the grid level of the mass the encoder
    quantized (the mass of the codec's top-k: `small` keeps 50 of 128), within the grid's
    0.55 step in sqrt(p) of the float64 mass."""
    ds = Dataset(write_dataset(tmp_path / preset, docs, preset))
    values = ds.codec.values
    assert ds.codec.stores_tail and values.transform == "sqrt"
    levels = grid.sqrt_levels(values.step).astype(np.float32)
    k = ds.codec.k
    out = list(ds.iter_documents(hidden_layers=[]))
    for src, got in zip(docs, out):
        lps = src.topk_logprobs.numpy()[:, :k]
        _, mass = values.quantize(lps)
        want = levels[grid.quantize_mass(mass, "sqrt", values.step)]
        assert got.tail_mass.dtype == torch.float32
        assert torch.equal(got.tail_mass, torch.from_numpy(want))
        exact = np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(1), 0.0, 1.0)
        err = np.abs(np.sqrt(got.tail_mass.numpy().astype(np.float64)) - np.sqrt(exact))
        assert (err <= 0.55 * values.step).all()


def test_codecs_without_a_stored_tail_decode_none(tmp_path, docs):
    for name, config in (("exact", "exact"), ("grid", _no_tail_default())):
        ds = Dataset(write_dataset(tmp_path / name, docs, config))
        assert not ds.codec.stores_tail
        assert all(d.tail_mass is None for d in ds.iter_documents(hidden_layers=[]))


def test_dump_and_verify_carry_the_stored_tail(tmp_path, docs):
    path = write_dataset(tmp_path / "default", docs, "default")
    decoded = list(Dataset(path).iter_documents(hidden_layers=[]))
    arrays = dump_arrays(path)
    for doc in decoded:
        tail = arrays[f"{doc.doc_id}/tail_mass"]
        tmask = np.ones(doc.num_tokens, bool) if doc.teacher_mask is None else doc.teacher_mask
        assert tail.shape == (doc.num_tokens,) and np.isnan(tail[~tmask]).all()
        np.testing.assert_array_equal(tail[tmask], doc.tail_mass.numpy())
    assert verify_dataset(path, deep=True).ok
    exact = write_dataset(tmp_path / "exact", docs, "exact")
    assert not any(key.endswith("/tail_mass") for key in dump_arrays(exact))


def _pieces(decoded):
    return [(i, 0, d.num_tokens) for i, d in enumerate(decoded)]


def _teacher_rows(doc):
    return np.arange(doc.num_tokens) if doc.teacher_mask is None \
        else np.nonzero(doc.teacher_mask)[0]


@pytest.mark.parametrize("stored", [True, False])
def test_packing_uses_the_stored_tail_else_recomputes(tmp_path, docs, stored):
    config = "default" if stored else _no_tail_default()
    ds = Dataset(write_dataset(tmp_path / "ds", docs, config))
    decoded = list(ds.iter_documents(hidden_layers=[]))
    batch = assemble(dict(enumerate(decoded)), _pieces(decoded), k=ds.codec.k)
    offsets = np.cumsum([0] + [d.num_tokens for d in decoded])
    want = torch.zeros_like(batch.tail)
    for r, pos in enumerate(batch.row_pos.tolist()):
        i = int(np.searchsorted(offsets, pos, side="right") - 1)
        doc, p = decoded[i], pos - offsets[i]
        rows = _teacher_rows(doc)
        if p in rows:
            row = int(np.searchsorted(rows, p))
            want[r] = doc.tail_mass[row] if stored else \
                missing_mass(doc.topk_logprobs[row:row + 1])[0]
    assert torch.equal(batch.tail, want)
    recomputed = torch.where(batch.has_teacher, missing_mass(batch.topk_logprobs), 0.0)
    assert torch.equal(batch.tail, recomputed) != stored


@pytest.mark.parametrize("decode_on",
                         ["worker", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stream_batches_carry_the_stored_tail(tmp_path, docs, decode_on):
    """Through the training loader (decoding in the reader, or on the training device): the
    loss rows' tail is the stored one, row for row."""
    path = write_dataset(tmp_path / "ds", docs, "default")
    stored = {d.doc_id: d for d in Dataset(path).iter_documents(hidden_layers=[])}
    stream = DistillStream(path, build_index(Dataset(path)), seq_len=40, packing="concat",
                           shuffle=True, shuffle_block=2, streams=1, seed=1,
                           decode_in_worker=decode_on == "worker")
    rows_seen = 0
    for m in range(stream.micro_batches()):
        b = stream.read_micro_batch(m)
        if decode_on != "worker":
            b = stream.materialize(b, decode_on)
        assert b.tail.device.type == b.topk_logprobs.device.type
        want = []
        bounds = b.cu_seqlens.tolist()
        pos_doc = [(doc_id, s + j) for doc_id, s, lo, hi in
                   zip(b.doc_ids, b.piece_starts, bounds, bounds[1:]) for j in range(hi - lo)]
        for pos in b.row_pos.tolist():
            doc_id, p = pos_doc[pos]
            rows = _teacher_rows(stored[doc_id])
            want.append(float(stored[doc_id].tail_mass[int(np.searchsorted(rows, p))])
                        if p in rows else 0.0)
        assert b.tail.tolist() == want
        rows_seen += int(b.has_teacher.sum())
    assert rows_seen == sum(int(_trained_teacher_rows(d).sum()) for d in stored.values())


def _trained_teacher_rows(doc) -> np.ndarray:
    """[T] bool: positions with a teacher row that the loss mask keeps."""
    has = np.ones(doc.num_tokens, bool) if doc.teacher_mask is None else doc.teacher_mask
    return has if doc.loss_mask is None else has & doc.loss_mask
