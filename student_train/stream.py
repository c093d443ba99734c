"""The order of a training epoch and its partition over ranks and workers: pure numpy functions.

Deterministic from a few integers (seed, epoch, world size, rank, workers), resumable from
``StreamState`` (epoch, sample_in_epoch), after the model of MosaicML streaming:

1. ``stream_documents``: the dataset's row groups are permuted (seed, epoch) and dealt in
   contiguous runs to ``streams`` canonical streams; inside a stream, the documents of every
   block of ``block`` consecutive row groups are permuted. Shuffling is therefore at row-group
   and at document level while a reader only ever needs one block of row groups at a time.
2. ``packing.pack_documents`` cuts each stream's documents into sequences of ``seq_len`` tokens.
3. ``interleave``: the global sequence order takes one sequence of every stream in turn.
4. ``rank_sequences``: a global step takes the next ``G = world * grad_accum * micro_batch``
   sequences; rank r takes every world-th of them, starting at r. The set of sequences in a
   step does not depend on the world size, so one process with ``grad_accum * world`` matches
   ``world`` processes (the multi-process test checks it). With ``streams`` a multiple of the
   world size, each rank reads only its own streams' row groups.
5. Workers of a rank take its micro-batches round-robin, which is the order in which a
   ``DataLoader`` collects them.

Resumption recomputes the plan of the epoch and starts at ``sample_in_epoch``; nothing is
replayed. Trade-off: every worker of a rank reads the row groups its micro-batches need, so
with W workers a row group may be read up to W times (row groups stay cached per worker).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .packing import pack_documents


@dataclass(frozen=True)
class StreamState:
    """Where the data stream stands: the resume state saved in every checkpoint."""

    epoch: int = 0
    sample_in_epoch: int = 0      # global sequences of this epoch already consumed
    seed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class World:
    """This process's place: data-parallel rank and DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, salt])


def stream_documents(rg_docs: np.ndarray, *, seed: int, epoch: int, streams: int = 1,
                     block: int = 4, shuffle: bool = True) -> list[np.ndarray]:
    """Global document indices of each canonical stream, in reading order.

    ``rg_docs`` [G]: documents per row group, in dataset order (document ids are consecutive
    across row groups). Returns ``streams`` int64 arrays whose concatenation is a permutation
    of ``range(sum(rg_docs))``; without ``shuffle``, stream s holds a contiguous run of the
    dataset in order.
    """
    rg_docs = np.asarray(rg_docs, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(rg_docs)])
    n_rg = len(rg_docs)
    rg_order = _rng(seed, epoch, 0).permutation(n_rg) if shuffle else np.arange(n_rg)
    out = []
    for s, rgs in enumerate(np.array_split(rg_order, streams)):        # contiguous runs
        rng = _rng(seed, epoch, 1 + s)
        parts = []
        for b in range(0, len(rgs), block):
            docs = np.concatenate([np.arange(first[g], first[g + 1]) for g in rgs[b:b + block]]
                                  or [np.zeros(0, np.int64)])
            parts.append(rng.permutation(docs) if shuffle else docs)
        out.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return out


def interleave(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round-robin order over streams with ``counts[s]`` sequences each.

    Returns (stream [N], local index [N]) of global sequence 0..N-1: the first sequence of
    every stream, then the second of every stream that has one, and so on.
    """
    counts = np.asarray(counts, dtype=np.int64)
    stream = np.repeat(np.arange(len(counts)), counts)
    local = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, int)
    order = np.lexsort((stream, local))                     # by local index, then stream
    return stream[order], local[order]


@dataclass(frozen=True)
class EpochPlan:
    """Every piece of every global sequence of one epoch (CSR by sequence).

    Pieces of sequence g are ``[seq_ptr[g], seq_ptr[g + 1])``; piece p is tokens
    ``[start[p], start[p] + length[p])`` of document ``doc[p]`` (a global document index).
    """

    epoch: int
    seq_ptr: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    @property
    def num_sequences(self) -> int:
        return len(self.seq_ptr) - 1

    def pieces(self, g: int) -> slice:
        return slice(int(self.seq_ptr[g]), int(self.seq_ptr[g + 1]))


def plan_epoch(rg_docs: np.ndarray, doc_tokens: np.ndarray, *, seed: int, epoch: int,
               seq_len: int, packing: str = "whole", streams: int = 1, block: int = 4,
               shuffle: bool = True) -> EpochPlan:
    """The epoch's global sequences: shuffle, split into streams, pack, interleave."""
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    per_stream = []
    for docs in stream_documents(rg_docs, seed=seed, epoch=epoch, streams=streams, block=block,
                                 shuffle=shuffle):
        docs = docs[doc_tokens[docs] > 0]                   # empty documents train nothing
        seq, pos, start, length = pack_documents(doc_tokens[docs], seq_len, packing)
        per_stream.append((seq, docs[pos], start, length))
    counts = np.array([int(s[0][-1]) + 1 if len(s[0]) else 0 for s in per_stream], np.int64)
    stream_of, local_of = interleave(counts)
    # rank of (stream, local sequence) in the global order
    offsets = np.concatenate([[0], np.cumsum(counts)])
    global_id = np.empty(int(counts.sum()), np.int64)
    global_id[offsets[stream_of] + local_of] = np.arange(len(stream_of))
    g = np.concatenate([global_id[offsets[s] + p[0]] for s, p in enumerate(per_stream)]
                       or [np.zeros(0, np.int64)])
    cat = [np.concatenate([p[i] for p in per_stream] or [np.zeros(0, np.int64)])
           for i in (1, 2, 3)]
    order = np.argsort(g, kind="stable")                    # pieces keep their in-sequence order
    seq_ptr = np.searchsorted(g[order], np.arange(len(stream_of) + 1), side="left")
    return EpochPlan(epoch, seq_ptr.astype(np.int64), *(c[order] for c in cat))


def global_batch(*, world_size: int, grad_accum: int, micro_batch: int) -> int:
    """Sequences per optimizer step over all ranks."""
    return world_size * grad_accum * micro_batch


def micro_batches_left(num_sequences: int, sample_in_epoch: int, *, world_size: int,
                       grad_accum: int, micro_batch: int) -> int:
    """Micro-batches each rank runs from ``sample_in_epoch`` to the end of the epoch; the last
    step is completed with empty filler sequences so every rank runs the same number."""
    G = global_batch(world_size=world_size, grad_accum=grad_accum, micro_batch=micro_batch)
    steps = -(-max(num_sequences - sample_in_epoch, 0) // G)
    return steps * grad_accum


def rank_sequences(m: int, *, sample_in_epoch: int, world_size: int, rank: int,
                   grad_accum: int, micro_batch: int) -> np.ndarray:
    """Global sequence ids of this rank's micro-batch ``m`` (counted from ``sample_in_epoch``).

    Step ``s = m // grad_accum`` covers ``[start + s*G, start + (s+1)*G)``; rank r takes the
    ids ``r, r + world, r + 2*world, ...`` of it, ``micro_batch`` per micro-batch. Ids at or
    beyond the epoch's sequence count are fillers (no tokens).
    """
    G = global_batch(world_size=world_size, grad_accum=grad_accum, micro_batch=micro_batch)
    s, a = divmod(m, grad_accum)
    i = a * micro_batch + np.arange(micro_batch)            # index among the rank's step share
    return sample_in_epoch + s * G + i * world_size + rank


def worker_micro_batches(total: int, *, worker: int, num_workers: int) -> range:
    """The micro-batches (of ``total``) a DataLoader worker produces, in order."""
    return range(worker, total, max(num_workers, 1))


def advance(state: StreamState, num_sequences: int, consumed: int) -> StreamState:
    """The state after ``consumed`` more global sequences (an epoch ends when all are used)."""
    sample = state.sample_in_epoch + consumed
    if sample >= num_sequences:
        return StreamState(epoch=state.epoch + 1, sample_in_epoch=0, seed=state.seed)
    return StreamState(epoch=state.epoch, sample_in_epoch=sample, seed=state.seed)
