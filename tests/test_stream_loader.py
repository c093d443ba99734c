"""The streaming loader on a real (synthetic-teacher) dataset: every document once per epoch
across ranks and DataLoader workers, teacher rows aligned with tokens after packing and
splitting, masks honoured, mid-epoch resume, and decoding on the training device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.student_train.packing import IGNORE
from kdpipe.student_train.stream import StreamState
from kdpipe.student_train.stream_loader import (DistillStream, RawBatch, TrainBatches, build_index,
                                                make_loader)
from kdpipe.compress import Dataset
from test_train_fixtures import LAYERS, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "ds"
    docs = write_dataset(out, n_docs=30, teacher_mask_every=4, loss_mask_every=3,
                         max_len=50)
    return out, {d.doc_id: d for d in docs}


def _stream(path, *, rank=0, world=1, accum=1, micro=2, seq_len=32, workers_decode=True,
            packing="whole", streams=1, hidden=LAYERS):
    return DistillStream(str(path), build_index(Dataset(str(path))), seq_len=seq_len,
                         packing=packing, shuffle=True, shuffle_block=2, streams=streams, seed=7,
                         rank=rank, world_size=world, grad_accum=accum, micro_batch=micro,
                         hidden_layers=list(hidden), decode_in_worker=workers_decode)


@pytest.mark.parametrize("world,workers,streams", [(1, 0, 1), (2, 2, 2), (3, 2, 1)])
def test_every_document_once_per_epoch_across_ranks_and_workers(dataset, world, workers,
                                                                 streams):
    path, docs = dataset
    covered = {d: np.zeros(doc.num_tokens, int) for d, doc in docs.items()}
    steps = []
    for rank in range(world):
        stream = _stream(path, rank=rank, world=world, accum=2, streams=streams)
        batches = list(make_loader(stream, workers=workers, pin_memory=False))
        steps.append(len(batches))
        for b in batches:
            for doc_id, s, n in zip(b.doc_ids, b.piece_starts, b.cu_seqlens.diff().tolist()):
                covered[doc_id][s:s + n] += 1
    assert len(set(steps)) == 1
    for doc_id, c in covered.items():
        assert (c == 1).all(), doc_id


@pytest.mark.parametrize("packing", ["whole", "concat"])
def test_batches_align_teacher_rows_labels_and_hidden(dataset, packing):
    path, docs = dataset
    for b in _stream(path, packing=packing, seq_len=20):
        ids = b.input_ids[0]
        bounds = b.cu_seqlens.tolist()
        pos_doc = []                                      # (doc, position in doc) per token
        for (doc_id, s), lo, hi in zip(zip(b.doc_ids, b.piece_starts), bounds, bounds[1:]):
            doc = docs[doc_id]
            assert torch.equal(ids[lo:hi], torch.from_numpy(doc.input_ids[s:s + hi - lo]).long())
            pos_doc += [(doc, s + i) for i in range(hi - lo)]
        for layer in LAYERS:
            want = torch.stack([doc.hidden[layer][p] for doc, p in pos_doc]).float()
            assert torch.equal(b.hidden[layer], want)
        expect_mask = [True if d.loss_mask is None else bool(d.loss_mask[p]) for d, p in pos_doc]
        assert b.hidden_pos.tolist() == [i for i, m in enumerate(expect_mask) if m]
        assert b.bounds == bounds
        assert b.counts() == {"kd_rows": int(b.has_teacher.sum()),
                              "ce_rows": int((b.labels != IGNORE).sum()),
                              "hidden_tokens": sum(expect_mask), "tokens": bounds[-1]}
        for r, pos in enumerate(b.row_pos.tolist()):
            doc, p = pos_doc[pos]
            assert expect_mask[pos]
            label = int(doc.input_ids[p + 1]) if p + 1 < doc.num_tokens else IGNORE
            assert int(b.labels[r]) == label
            has = doc.teacher_mask is None or bool(doc.teacher_mask[p])
            assert bool(b.has_teacher[r]) == has
            if has:
                row = p if doc.teacher_mask is None else int(doc.teacher_mask[:p].sum())
                assert torch.equal(b.topk_ids[r], doc.topk_ids[row])
                assert torch.equal(b.topk_logprobs[r], doc.topk_logprobs[row])
                torch.testing.assert_close(float(b.tail[r]),
                                           float(1 - doc.topk_logprobs[row].double().exp().sum()))
        # every position that is trained on and has a target is a loss row
        rows = set(b.row_pos.tolist())
        for pos, (doc, p) in enumerate(pos_doc):
            has = doc.teacher_mask is None or bool(doc.teacher_mask[p])
            if expect_mask[pos] and (has or p + 1 < doc.num_tokens):
                assert pos in rows


def _flat(batch):
    return (batch.input_ids.tolist(), batch.doc_ids, batch.piece_starts,
            batch.topk_logprobs.sum().item())


def test_mid_epoch_resume_continues_the_same_order(dataset):
    path, _ = dataset
    full = TrainBatches(_stream(path, accum=2), StreamState(seed=7), workers=0,
                        device=torch.device("cpu"))
    steps, states = [], []
    for _ in range(12):                                   # crosses an epoch boundary
        batches, state = full.next_step()
        steps.append([_flat(b) for b in batches])
        states.append(state)
    assert states[-1].epoch >= 1
    for k in (2, 5, 9):                                   # reading ahead changes nothing
        resumed = TrainBatches(_stream(path, accum=2), states[k - 1], workers=2,
                               device=torch.device("cpu"))
        for i in range(k, 12):
            batches, state = resumed.next_step(prefetch_next=i % 3 != 0)
            assert resumed.state == state
            assert [_flat(b) for b in batches] == steps[i]
            assert state == states[i]
        resumed.close()


def test_decoding_on_the_training_device_matches_worker_decoding(dataset):
    path, _ = dataset
    raw = list(make_loader(_stream(path, workers_decode=False), workers=1, pin_memory=False))
    assert all(isinstance(r, RawBatch) for r in raw)
    host = list(_stream(path))
    stream = _stream(path, workers_decode=False)
    for r, h in zip(raw, host):
        d = stream.materialize(r, "cpu")
        assert _flat(d) == _flat(h)
        for layer in LAYERS:
            assert torch.equal(d.hidden[layer], h.hidden[layer])


def test_only_requested_hidden_layers_are_read(dataset):
    path, _ = dataset
    b = next(iter(_stream(path, hidden=[2])))
    assert list(b.hidden) == [2]
    b = next(iter(_stream(path, hidden=[])))
    assert b.hidden == {}


@pytest.mark.gpu
def test_prefetching_on_a_side_stream_hands_out_what_reading_in_turn_does(dataset):
    """On CUDA the next step is decoded on another stream while the GPU is busy: the batches
    are the same as decoded in turn, once the main stream has waited for them."""
    path, _ = dataset
    cuda = torch.device("cuda")
    in_turn = TrainBatches(_stream(path, accum=2, workers_decode=False), StreamState(seed=7),
                           workers=1, device=cuda)
    ahead = TrainBatches(_stream(path, accum=2, workers_decode=False), StreamState(seed=7),
                         workers=1, device=cuda)
    busy = torch.randn(4096, 4096, device=cuda)
    for _ in range(8):                                    # crosses an epoch boundary
        expected, state = in_turn.next_step()
        for _ in range(20):                               # keep the main stream busy
            busy = busy @ busy / busy.norm()
        got, got_state = ahead.next_step(prefetch_next=True)
        assert got_state == state
        for a, b in zip(got, expected):
            assert _flat(a) == _flat(b)
            for layer in LAYERS:
                assert torch.equal(a.hidden[layer], b.hidden[layer])
    in_turn.close()
    ahead.close()
