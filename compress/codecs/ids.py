"""Token-id codecs: fixed-width bit packing (rank order) and entropy-coded id sets (id order).

Ids are most of the bytes of a top-k row (16 bits each at a 49k vocabulary, 80-90% of
a DistillKit row). In rank order they are nearly incompressible: zstd over them saves
about 13% on real teacher data. But the rank order is redundant with the values: once
the values are stored alongside, the *set* of ids is enough, and a sorted set is
cheap -- its gaps are small and skewed. ``gaps`` stores each row's set in ascending
order (of id, or of rank in a per-document dictionary: 103 of the packed form's 256
bytes at k=128 on the embedded teacher, 137 without the dictionary); the facade hands
the values over in the same order and restores rank order from them on decode.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from kdpipe.schemas import CodecError, ConfigError

from . import entropy
from .base import (IDS, Capabilities, IdsCodec, check_ids, fixed_width_concat, register, sort_rows,
                   tensor_from_bytes)
from .bitpack import MAX_BITS, pack_rows, row_bytes, unpack_rows


def vocab_bits(vocab_size: int) -> int:
    """Bits per id for a vocabulary, as DistillKit computes them: ceil(log2(d))."""
    return max(1, math.ceil(math.log2(vocab_size)))


@register(IDS, "packed")
class PackedIds(IdsCodec):
    """Rank-ordered ids, ``bits`` each, MSB first, every row padded to a byte (DistillKit's
    ``bytepacked_indices``). ``bits`` defaults to ceil(log2(vocab_size))."""

    capabilities = Capabilities(lossless=True)

    def __init__(self, params: dict[str, Any], *, vocab_size: int, k: int) -> None:
        super().__init__(params, vocab_size=vocab_size, k=k)
        unknown = sorted(set(params) - {"bits"})
        if unknown:
            raise ConfigError(f"ids packed: unknown parameters {unknown}")
        bits = params.get("bits") or vocab_bits(vocab_size)
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"ids packed: bits must be an integer in [1, {MAX_BITS}], "
                              f"got {bits!r}")
        if vocab_size > 1 << bits:
            raise ConfigError(f"ids packed: {bits} bits hold ids below {1 << bits}, but the "
                              f"vocabulary has {vocab_size} tokens")
        self.bits = bits
        self.row_bytes = row_bytes(k, bits)

    def encode(self, ids: np.ndarray) -> bytes:
        return pack_rows(ids, self.bits).tobytes()

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        data = fixed_width_concat(blobs, rows, self.row_bytes, f"ids packed{self.bits}")
        packed = tensor_from_bytes(data, torch.uint8, device).view(-1, self.row_bytes)
        return check_ids(unpack_rows(packed, self.k, self.bits), self.vocab_size,
                         f"ids packed{self.bits}")


@register(IDS, "gaps")
class GapIds(IdsCodec):
    """The id set of each row as ascending gaps (``x[j] - x[j-1] - 1``), symbol streams
    through zstd.

    With ``dictionary`` (the default) ``x`` is not the id but its rank in the document's
    own dictionary: the distinct ids of the document ordered by how often they occur (in
    log2 classes, then by id), stored once per document as id gaps plus one class byte
    each. A document reuses a few thousand ids, the frequent ones in most rows, so rows
    become runs of small ranks: about 25% fewer bytes than gaps over the vocabulary on
    real teacher data, and never much more (a one-row document's dictionary is its row).
    Rows are stored in ascending rank (not in rank order), so decoding needs no sort until
    the reader restores rank order.

    Params: ``dictionary`` (default true), ``level`` (zstd, default 1: on the embedded
    teacher's rows level 3 gives the same size and the codec encodes ~1.3x slower;
    ``bench/bench_codecs.py``, row ``default-zstd3``).
    """

    capabilities = Capabilities(lossless=True, rank_order=False, entropy_coded=True)

    def __init__(self, params: dict[str, Any], *, vocab_size: int, k: int) -> None:
        super().__init__(params, vocab_size=vocab_size, k=k)
        unknown = sorted(set(params) - {"dictionary", "level"})
        if unknown:
            raise ConfigError(f"ids gaps: unknown parameters {unknown}")
        self.dictionary = bool(params.get("dictionary", True))
        self.level = entropy.check_level(params.get("level", 1), "ids gaps")
        self.tag = entropy.params_tag("ids.gaps", {"dictionary": self.dictionary})
        self.n_streams = 3 if self.dictionary else 1

    @staticmethod
    def _ascending_gaps(x: np.ndarray) -> np.ndarray:
        """Rows ascending without repeats -> ``x[j] - x[j-1] - 1`` (``x[-1]`` taken as -1)."""
        gaps = np.empty_like(x)
        gaps[:, 0] = x[:, 0]
        np.subtract(x[:, 1:], x[:, :-1], out=gaps[:, 1:])
        gaps[:, 1:] -= 1
        if gaps.size and gaps.min() < 0:
            raise CodecError("ids gaps: a row's ids are not in ascending order without "
                             "repeats (duplicate ids in a top-k row, or rows not in the "
                             "codec's order)")
        return gaps

    def _dictionary(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct ids ascending, their count classes, every entry's dictionary rank).

        Ranks order the dictionary by count class (floor(log2 count)) descending, then by
        id; classes rather than counts, so the per-document header stays small.
        """
        counts = np.bincount(ids.reshape(-1), minlength=self.vocab_size)
        dictionary = np.flatnonzero(counts != 0)         # ~3x faster on a bool mask
        classes = np.frexp(counts[dictionary])[1] - 1    # floor(log2), exact for integers
        # the dictionary is ascending, so a stable sort by class keeps ids ascending
        # within a class (int8 keys: numpy's radix sort)
        order = np.argsort(-classes.astype(np.int8), kind="stable")
        lookup = np.empty(self.vocab_size, np.int32)     # read only at ids in the dictionary
        lookup[dictionary[order]] = np.arange(len(dictionary), dtype=np.int32)
        return dictionary, classes, np.take(lookup, ids)

    def encode_ordered(self, ids: np.ndarray, carry: np.ndarray | None = None,
                       carry_bound: int = 0) -> tuple[bytes, np.ndarray | None]:
        if not self.dictionary:
            return super().encode_ordered(ids, carry, carry_bound)
        dictionary, classes, ranks = self._dictionary(np.asarray(ids))
        ranks, carried = sort_rows(ranks, len(dictionary), carry, carry_bound)
        return self._encode_dictionary(dictionary, classes, ranks), carried

    def encode(self, ids: np.ndarray) -> bytes:
        ids = np.asarray(ids)
        if not self.dictionary:
            return entropy.pack_container(self.tag, ids.shape[0], self.k, [
                entropy.encode_symbols(self._ascending_gaps(ids), self.level)])
        return self._encode_dictionary(*self._dictionary(ids))

    def _encode_dictionary(self, dictionary: np.ndarray, classes: np.ndarray,
                           ranks: np.ndarray) -> bytes:
        return entropy.pack_container(self.tag, ranks.shape[0], self.k, [
            entropy.encode_symbols(np.diff(dictionary, prepend=-1) - 1, self.level),
            entropy.encode_symbols(classes, self.level),
            entropy.encode_symbols(self._ascending_gaps(ranks), self.level)])

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        what = "ids gaps"
        docs = entropy.unpack_documents(blobs, rows, self.tag, self.k, self.n_streams, what)
        counts = [n * self.k for n in rows]
        gaps, _ = entropy.decode_symbols([d[-1] for d in docs], counts, device, what)
        x = gaps.view(-1, self.k)
        if not self.dictionary:
            x = torch.cumsum(x.add_(1), dim=1, dtype=torch.int32).sub_(1)
            return check_ids(x, self.vocab_size, what)
        table, starts, sizes = self._dictionaries(docs, rows, device, what)
        # with every gap below the batch's dictionary size, no row sum can overflow, so
        # the row-end check below catches every bad index
        if x.numel() and int(x.max()) >= max(table.numel(), 1):
            raise CodecError(f"{what}: a gap beyond the document's dictionary (corrupt data)")
        wide = (self.k + 1) * (table.numel() + 1) >= 1 << 31
        doc_of_row = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                             torch.tensor(list(rows), dtype=torch.int64,
                                                          device=device))
        # ranks are offset into the batch's concatenated dictionaries through each row's
        # first gap, so the cumulative sum yields table indices directly
        x = x.long() if wide else x
        x[:, 0] += starts[doc_of_row]
        x = x.add_(1).cumsum_(dim=1).sub_(1)
        if x.numel() and bool((x[:, -1] >= (starts + sizes)[doc_of_row]).any()):
            raise CodecError(f"{what}: a row refers past its document's dictionary (corrupt data)")
        return table.index_select(0, x.view(-1)).view(x.shape)

    def _dictionaries(self, docs: list[list[bytes]], rows: Sequence[int], device: torch.device,
                      what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every document's dictionary in rank order, concatenated, with starts and sizes.

        Built on the CPU whatever the device: dictionaries are a few thousand entries per
        document, and per document the rank order is one stable radix sort of int8
        classes (the ids are already ascending).
        """
        cpu = torch.device("cpu")
        gaps, sizes = entropy.decode_symbols(
            [d[0] for d in docs], None, cpu, f"{what} dictionary",
            limits=[min(n * self.k, self.vocab_size) for n in rows])
        classes, _ = entropy.decode_symbols([d[1] for d in docs], sizes, cpu, f"{what} classes")
        gaps, classes = gaps.numpy(), classes.numpy()
        if classes.size and int(classes.max()) > 63:
            raise CodecError(f"{what}: count class out of range (corrupt data)")
        table = np.empty(len(gaps), np.int64)
        start = 0
        for size in sizes:
            end = start + size
            ascending = np.cumsum(gaps[start:end] + 1, dtype=np.int64) - 1
            order = np.argsort(-classes[start:end].astype(np.int8), kind="stable")
            table[start:end] = ascending[order]
            start = end
        if table.size and int(table.max()) >= self.vocab_size:
            raise CodecError(f"{what} dictionary: token id {int(table.max())} outside the "
                             f"vocabulary [0, {self.vocab_size})")
        sizes_t = torch.tensor(sizes, dtype=torch.int32)
        starts = torch.cumsum(sizes_t, 0, dtype=torch.int32) - sizes_t
        return (torch.from_numpy(table.astype(np.int32)).to(device), starts.to(device),
                sizes_t.to(device))
