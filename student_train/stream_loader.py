"""Reading a kdpipe dataset as a stream of packed micro-batches.

``build_index`` checks every shard whole against the manifest's sha256 and reads only what
ordering needs (row-group sizes and the ``num_tokens`` column); ``DistillStream`` is a
``torch.utils.data.IterableDataset`` that, for each of its micro-batches (``stream.py``
says which), reads the row groups holding the documents it needs (a few cached per reader),
takes those rows, decodes them in one vectorized batch with the dataset's codec
(``compress.Dataset.decode_table``) and packs them (``packing.assemble``). Decoding runs in
the DataLoader worker (``decode_on: worker``) or, with ``decode_on: device``, the worker
ships the encoded rows and the training process decodes them on its device
(``materialize``). Nothing holds more than a few row groups.

``TrainBatches`` strings epochs together and yields one optimizer step of micro-batches at a
time with the ``StreamState`` reached after it: the state a checkpoint saves. It can read (on
CUDA also decode) the next step while the current one trains.
"""

from __future__ import annotations

import signal
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdpipe.compress import Dataset
from kdpipe.schemas import DatasetError
from kdpipe.schemas import arrow as cols

from .packing import PackedBatch, assemble
from .stream import (EpochPlan, StreamState, advance, global_batch, micro_batches_left,
                     plan_epoch, rank_sequences, worker_micro_batches)
from .train_dist import DistInfo


@dataclass(frozen=True)
class DatasetIndex:
    """Where every document is: row groups in dataset order and each document's length."""

    rg_shard: np.ndarray      # [G] shard number (index into the manifest's shards)
    rg_number: np.ndarray     # [G] row group number within its shard
    rg_docs: np.ndarray       # [G] documents per row group
    doc_tokens: np.ndarray    # [D] tokens per document
    skipped: dict[str, str] = field(default_factory=dict)   # shard file left out -> why

    @property
    def rg_first_doc(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rg_docs)])

    @property
    def num_documents(self) -> int:
        return int(self.rg_docs.sum())

    def locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global document ids -> (row group, row within it)."""
        first = self.rg_first_doc
        rg = np.searchsorted(first, docs, side="right") - 1
        return rg, docs - first[rg]


def build_index(ds: Dataset, *, on_corrupt: str = "error", dist: DistInfo = DistInfo(),
                skipped: Mapping[str, str] | None = None) -> DatasetIndex:
    """Row-group sizes and ``num_tokens`` of every shard that passes its checks.

    Page checksums miss damage to footers and page headers, so each shard is first checked
    whole against the manifest's sha256, before any of its values can reach a loss. Rank r
    hashes every ``world_size``-th shard (one streaming read per shard, split over the
    ranks), and the verdicts are summed over ranks: every rank, and the DataLoader workers
    that inherit the index, agree on what is left out. Corrupt shards raise a
    ``DatasetError`` naming them, or with ``on_corrupt="skip"`` are left out and listed in
    ``index.skipped``. ``skipped``: shards an earlier start of the run left out, left out
    again unchecked so that the resumed run keeps its data order.
    """
    skipped = dict(skipped or {})
    sizes: dict[int, list[np.ndarray]] = {}
    failed: dict[str, str] = {}
    for s, entry in enumerate(ds.shards):
        if entry.file in skipped:
            continue
        try:
            pf = ds.open_shard(entry, verify_sha256=s % dist.world_size == dist.rank)
            sizes[s] = [ds.read_row_group(entry, pf, rg, [cols.NUM_TOKENS]).column(0).to_numpy()
                        for rg in range(pf.num_row_groups)]
        except DatasetError as e:
            failed[entry.file] = str(e)
    votes = dist.all_reduce_sum({e.file: float(e.file in failed) for e in ds.shards})
    corrupt = {e.file: failed.get(e.file, f"{ds.storage.describe(e.file)}: failed its checks "
                                          f"on another rank")
               for e in ds.shards if votes[e.file]}
    if corrupt and on_corrupt != "skip":
        raise DatasetError(f"{len(corrupt)} corrupt shard(s), not reading them (restore them, "
                           f"e.g. by rerunning their capture part, or have training leave them "
                           f"out with data.on_corrupt_shard=skip): " + "; ".join(corrupt.values()))
    skipped.update(corrupt)
    rg_shard, rg_number, rg_docs, tokens = [], [], [], []
    for s, per_rg in sizes.items():
        if ds.shards[s].file in skipped:
            continue
        for rg, n in enumerate(per_rg):
            rg_shard.append(s)
            rg_number.append(rg)
            rg_docs.append(len(n))
            tokens.append(n.astype(np.int64))
    if not rg_docs or sum(rg_docs) == 0:
        raise DatasetError("dataset holds no documents" + (
            f" outside its {len(skipped)} corrupt shard(s)" if skipped else ""),
            file=ds.storage.describe(""))
    return DatasetIndex(np.array(rg_shard), np.array(rg_number), np.array(rg_docs, np.int64),
                        np.concatenate(tokens), skipped)


class RowGroupCache:
    """The last ``capacity`` row groups read (encoded Arrow tables), per process."""

    def __init__(self, ds: Dataset, index: DatasetIndex, columns: list[str], capacity: int):
        self.ds, self.index, self.columns, self.capacity = ds, index, columns, capacity
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()
        self._files: dict[int, object] = {}

    def get(self, rg: int) -> pa.Table:
        if rg in self._tables:
            self._tables.move_to_end(rg)
            return self._tables[rg]
        shard = int(self.index.rg_shard[rg])
        entry = self.ds.shards[shard]
        if shard not in self._files:
            if len(self._files) >= self.capacity:
                self._files.pop(next(iter(self._files)))
            self._files[shard] = self.ds.open_shard(entry)
        table = self.ds.read_row_group(entry, self._files[shard], int(self.index.rg_number[rg]),
                                       self.columns)
        self._tables[rg] = table
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
        return table


@dataclass
class RawBatch:
    """A micro-batch still encoded: the rows of its documents and its pieces over them."""

    table: pa.Table | None
    pieces: list[tuple[int, int, int]]        # (row in table, start, length)


class DistillStream(IterableDataset):
    """Packed micro-batches of one rank for one epoch at a time (see ``stream.py``)."""

    def __init__(self, uri: str, index: DatasetIndex, *, seq_len: int, packing: str,
                 shuffle: bool, shuffle_block: int, streams: int, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, micro_batch: int = 1,
                 hidden_layers: list[int] = (), decode_in_worker: bool = True,
                 cache_row_groups: int = 8, limit_tokens: int = 0) -> None:
        self.uri, self.index = uri, index
        self.seq_len, self.packing, self.shuffle = seq_len, packing, shuffle
        self.shuffle_block, self.streams, self.seed = shuffle_block, streams, seed
        self.rank, self.world_size = rank, world_size
        self.grad_accum, self.micro_batch = grad_accum, micro_batch
        self.hidden_layers = list(hidden_layers)
        self.decode_in_worker = decode_in_worker
        self.cache_row_groups = cache_row_groups
        self.limit_tokens = limit_tokens
        self._ds: Dataset | None = None
        self._cache: RowGroupCache | None = None
        self.set_state(StreamState(seed=seed))

    # -- plan -------------------------------------------------------------------------------

    def set_state(self, state: StreamState) -> None:
        """Position the stream at ``state`` (its epoch's plan is recomputed, not replayed)."""
        if state.seed != self.seed:
            raise DatasetError(f"resume state has data seed {state.seed}, config has {self.seed}")
        self.state = state
        self.plan: EpochPlan = plan_epoch(
            self.index.rg_docs, self.index.doc_tokens, seed=self.seed, epoch=state.epoch,
            seq_len=self.seq_len, packing=self.packing, streams=self.streams,
            block=self.shuffle_block, shuffle=self.shuffle)
        self.num_sequences = self.plan.num_sequences
        if self.limit_tokens > 0:                 # evaluation on a prefix of the data
            per_seq = np.add.reduceat(self.plan.length, self.plan.seq_ptr[:-1]) \
                if len(self.plan.length) else np.zeros(0, np.int64)
            self.num_sequences = int(np.searchsorted(np.cumsum(per_seq), self.limit_tokens) + 1)
            self.num_sequences = min(self.num_sequences, self.plan.num_sequences)

    @property
    def global_batch(self) -> int:
        return global_batch(world_size=self.world_size, grad_accum=self.grad_accum,
                            micro_batch=self.micro_batch)

    def micro_batches(self) -> int:
        """Micro-batches this rank runs from the current state to the end of the epoch."""
        return micro_batches_left(self.num_sequences, self.state.sample_in_epoch,
                                  world_size=self.world_size, grad_accum=self.grad_accum,
                                  micro_batch=self.micro_batch)

    # -- reading ----------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = state["_cache"] = None     # reopened in each worker
        return state

    @property
    def dataset(self) -> Dataset:
        if self._ds is None:
            self._ds = Dataset(self.uri)
        return self._ds

    def _reader(self) -> RowGroupCache:
        if self._cache is None:
            self._cache = RowGroupCache(self.dataset, self.index,
                                        self.dataset.columns(self.hidden_layers),
                                        self.cache_row_groups)
        return self._cache

    def __iter__(self) -> Iterator[PackedBatch | RawBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for m in worker_micro_batches(self.micro_batches(), worker=worker, num_workers=workers):
            yield self.read_micro_batch(m)

    def pieces_of(self, m: int) -> list[tuple[int, int, int]]:
        """(global document, start, length) of every piece of micro-batch ``m``, in order."""
        seqs = rank_sequences(m, sample_in_epoch=self.state.sample_in_epoch,
                              world_size=self.world_size, rank=self.rank,
                              grad_accum=self.grad_accum, micro_batch=self.micro_batch)
        out = []
        for g in seqs[seqs < self.num_sequences].tolist():
            sl = self.plan.pieces(g)
            out += zip(self.plan.doc[sl].tolist(), self.plan.start[sl].tolist(),
                       self.plan.length[sl].tolist())
        return out

    def read_micro_batch(self, m: int) -> PackedBatch | RawBatch:
        pieces = self.pieces_of(m)
        if not pieces:                                 # a filler of the epoch's last step
            return self.materialize(RawBatch(None, []), "cpu")
        docs = np.unique(np.array([p[0] for p in pieces], np.int64))
        rgs, rows = self.index.locate(docs)
        reader = self._reader()
        parts = []
        for rg in np.unique(rgs).tolist():             # one take per row group
            parts.append(reader.get(rg).take(pa.array(rows[rgs == rg])))
        table = pa.concat_tables(parts)
        # rows of `table` follow (row group, row) order, which is the order of `docs`
        key = {int(d): i for i, d in enumerate(docs.tolist())}
        raw = RawBatch(table, [(key[d], s, n) for d, s, n in pieces])
        return self.materialize(raw, "cpu") if self.decode_in_worker else raw

    def materialize(self, raw: RawBatch, device: torch.device | str) -> PackedBatch:
        """Decode a raw micro-batch on ``device`` and pack it."""
        ds = self.dataset
        decoded = ds.decode_table(raw.table, hidden_layers=self.hidden_layers, device=device) \
            if raw.pieces else []
        sampled = ds.codec.signal == "sampled"    # its rows are [draws] wide, no top-k
        return assemble(dict(enumerate(decoded)), raw.pieces, k=0 if sampled else ds.codec.k,
                        hidden_layers=self.hidden_layers,
                        hidden_size=ds.manifest.teacher.hidden_size,
                        draws=ds.codec.k if sampled else 0)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the trainer, which stops at a step boundary
    and closes them: a terminal's Ctrl-C and a scheduler's preemption reach every process of
    the group, and a worker that died of one would fail the step being checkpointed. (A
    worker still exits when the trainer dies: torch's workers watch their parent.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(stream: DistillStream, *, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over one epoch of the stream (micro-batches arrive in rank order)."""
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, persistent_workers=False,
                      worker_init_fn=ignore_stop_signals if workers else None)


class TrainBatches:
    """Optimizer steps of micro-batches over consecutive epochs, from a resume state.

    ``next_step(prefetch_next=True)`` reads (and on CUDA decodes, on a CUDA stream of its own)
    the following step on a thread while the current step trains, so reading never holds up
    the GPU. The batches and states handed out are the same either way.
    """

    def __init__(self, stream: DistillStream, state: StreamState, *, workers: int,
                 device: torch.device) -> None:
        self.stream, self.workers, self.device = stream, workers, device
        self.state = state                  # after the steps handed out so far
        self._ahead = state                 # after the steps read so far
        self._it: Iterator | None = None
        self._next: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def next_step(self, prefetch_next: bool = False) -> tuple[list[PackedBatch], StreamState]:
        """The micro-batches of the next optimizer step and the state after it."""
        batches, state, ready = self._next.result() if self._next else self._read_step()
        self._next = None
        if prefetch_next:
            self._open()        # loader workers fork from this thread: forking from another
            self._next = self._pool.submit(self._read_step)     # while this one runs is unsafe
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for b in batches:               # memory the side stream allocated, used here
                b.record_stream(current)
        self.state = state
        return batches, state

    def close(self) -> None:
        """Finish a read in flight and stop the loader's workers (the steps handed out and
        ``state`` stay as they are)."""
        if self._next is not None:
            self._next.exception()          # waits; what it read is not handed out
            self._next = None
        self._pool.shutdown()
        self._it = None

    def _open(self) -> None:
        if self._it is None:                # a loader runs from its start state to epoch end
            self.stream.set_state(self._ahead)
            self._it = iter(make_loader(self.stream, workers=self.workers,
                                        pin_memory=self.device.type == "cuda"))

    def _read_step(self) -> tuple[list[PackedBatch], StreamState, torch.cuda.Event | None]:
        """The next step's micro-batches, its state and (on CUDA) the event that marks them
        decoded."""
        self._open()
        with torch.cuda.stream(self._side) if self._side is not None else nullcontext():
            batches = []
            for _ in range(self.stream.grad_accum):
                item = next(self._it)
                if isinstance(item, RawBatch):
                    item = self.stream.materialize(item, self.device)
                batches.append(item)
            self._ahead = advance(self._ahead, self.stream.num_sequences,
                                  self.stream.global_batch)
            if self._ahead.epoch != self.stream.state.epoch:
                self._it = None             # every micro-batch of the epoch has been taken
            return batches, self._ahead, \
                self._side.record_event() if self._side is not None else None
