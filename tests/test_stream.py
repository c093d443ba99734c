"""Property tests of the pure ordering, packing and partition functions (stream.py,
packing.pack_documents): permutations, exact coverage, disjoint ranks and workers,
world-size invariance of the global batch, determinism and resumption arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdpipe.student_train.packing import pack_documents
from kdpipe.student_train.stream import (StreamState, advance, interleave, micro_batches_left,
                                         plan_epoch, rank_sequences, stream_documents,
                                         worker_micro_batches)

rg_sizes = st.lists(st.integers(0, 12), min_size=1, max_size=12)
doc_lengths = st.lists(st.integers(0, 70), min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(rg=rg_sizes, seed=st.integers(0, 3), epoch=st.integers(0, 3), streams=st.integers(1, 5),
       block=st.integers(1, 4), shuffle=st.booleans())
def test_stream_documents_is_a_permutation(rg, seed, epoch, streams, block, shuffle):
    out = stream_documents(np.array(rg), seed=seed, epoch=epoch, streams=streams, block=block,
                           shuffle=shuffle)
    assert len(out) == streams
    allv = np.concatenate(out)
    assert np.array_equal(np.sort(allv), np.arange(sum(rg)))
    if not shuffle:
        assert np.array_equal(allv, np.arange(sum(rg)))


def test_shuffle_keeps_documents_within_their_block():
    rg = np.array([5] * 8)
    (docs,) = stream_documents(rg, seed=1, epoch=0, streams=1, block=2)
    blocks = docs.reshape(4, 10) // 5                     # row group of each document
    for b in blocks:
        assert len(set(b.tolist())) == 2                  # every block spans 2 row groups
    again = stream_documents(rg, seed=1, epoch=0, streams=1, block=2)[0]
    other = stream_documents(rg, seed=1, epoch=1, streams=1, block=2)[0]
    assert np.array_equal(docs, again) and not np.array_equal(docs, other)


@settings(max_examples=100, deadline=None)
@given(lengths=doc_lengths, seq_len=st.integers(1, 33), mode=st.sampled_from(["whole", "concat"]))
def test_packing_covers_every_token_once(lengths, seq_len, mode):
    lengths = np.array(lengths, np.int64)
    seq, doc, start, length = pack_documents(lengths, seq_len, mode)
    assert (length > 0).all()
    for i, n in enumerate(lengths):                       # pieces tile each document exactly
        mine = np.nonzero(doc == i)[0]
        got = sorted(zip(start[mine].tolist(), length[mine].tolist()))
        pos = 0
        for s, n_piece in got:
            assert s == pos
            pos += n_piece
        assert pos == n
    if len(seq):
        assert (np.diff(seq) >= 0).all() and seq[0] == 0
        totals = np.bincount(seq, weights=length)
        assert (totals <= seq_len).all() and (totals > 0).all()
        if mode == "concat":
            assert (totals[:-1] == seq_len).all()
        else:                                             # a document that fits is never cut
            for i, n in enumerate(lengths):
                if 0 < n <= seq_len:
                    assert (doc == i).sum() == 1


def test_whole_packing_example():
    seq, doc, start, length = pack_documents(np.array([5, 4, 3, 12, 2]), 8, "whole")
    assert list(zip(seq, doc, start, length)) == [
        (0, 0, 0, 5), (1, 1, 0, 4), (1, 2, 0, 3), (1, 3, 0, 1), (2, 3, 1, 8), (3, 3, 9, 3),
        (3, 4, 0, 2)]


def test_interleave_round_robin():
    stream, local = interleave(np.array([3, 1, 2]))
    assert list(zip(stream, local)) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


@settings(max_examples=40, deadline=None)
@given(rg=st.lists(st.integers(1, 9), min_size=1, max_size=8), seed=st.integers(0, 5),
       streams=st.integers(1, 4), seq_len=st.integers(4, 40))
def test_plan_epoch_covers_every_token_once(rg, seed, streams, seq_len):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 60, sum(rg))
    plan = plan_epoch(np.array(rg), tokens, seed=seed, epoch=0, seq_len=seq_len, streams=streams)
    covered = np.zeros(tokens.sum(), np.int64)
    offsets = np.concatenate([[0], np.cumsum(tokens)])
    for g in range(plan.num_sequences):
        sl = plan.pieces(g)
        assert 0 < plan.length[sl].sum() <= seq_len
        for d, s, n in zip(plan.doc[sl], plan.start[sl], plan.length[sl]):
            covered[offsets[d] + s: offsets[d] + s + n] += 1
    assert (covered == 1).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), start_steps=st.integers(0, 3), world=st.integers(1, 4),
       accum=st.integers(1, 3), micro=st.integers(1, 3), workers=st.integers(1, 3))
def test_ranks_and_workers_partition_the_epoch(n, start_steps, world, accum, micro, workers):
    G = world * accum * micro
    start = min(start_steps * G, (n // G) * G)
    seen = []
    per_rank = []
    for rank in range(world):
        total = micro_batches_left(n, start, world_size=world, grad_accum=accum,
                                   micro_batch=micro)
        per_rank.append(total)
        for w in range(workers):
            for m in worker_micro_batches(total, worker=w, num_workers=workers):
                seen += rank_sequences(m, sample_in_epoch=start, world_size=world, rank=rank,
                                       grad_accum=accum, micro_batch=micro).tolist()
    assert len(set(per_rank)) == 1                        # every rank runs the same steps
    real = [g for g in seen if g < n]
    assert sorted(real) == list(range(start, n))          # each sequence exactly once
    assert len(seen) == len(set(seen))


@given(world=st.sampled_from([1, 2, 4]), accum=st.integers(1, 2), micro=st.integers(1, 3))
def test_global_batch_is_independent_of_world_size(world, accum, micro):
    """Step s holds the same sequences for world ranks x accum as for 1 rank x world*accum."""
    def step_sets(world, accum):
        steps = {}
        for rank in range(world):
            for m in range(accum * 3):
                ids = rank_sequences(m, sample_in_epoch=0, world_size=world, rank=rank,
                                     grad_accum=accum, micro_batch=micro)
                steps.setdefault(m // accum, set()).update(ids.tolist())
        return steps
    assert step_sets(world, accum) == step_sets(1, world * accum)


def test_advance_moves_to_the_next_epoch():
    s = StreamState(epoch=2, sample_in_epoch=8, seed=3)
    assert advance(s, 20, 8) == StreamState(epoch=2, sample_in_epoch=16, seed=3)
    assert advance(s, 16, 8) == StreamState(epoch=3, sample_in_epoch=0, seed=3)
    assert advance(s, 12, 8) == StreamState(epoch=3, sample_in_epoch=0, seed=3)


@pytest.mark.parametrize("mode", ["whole", "concat"])
def test_pack_documents_rejects_bad_arguments(mode):
    with pytest.raises(ValueError):
        pack_documents(np.array([3]), 0, mode)
    with pytest.raises(ValueError):
        pack_documents(np.array([3]), 4, "greedy")
