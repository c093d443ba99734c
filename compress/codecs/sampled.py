"""The sampled teacher signal: each row's distinct token ids drawn from the teacher, with counts.

A top-k cache gives a biased picture of the teacher (everything outside the k is lost and
the rest renormalized); ``draws`` ids sampled per position from the teacher's distribution
give an unbiased one: ``count / draws`` is an unbiased estimate of the teacher's
probability of every id, so the cross-entropy against it is an unbiased estimate of the
full-distribution cross-entropy, and of its gradient. A row keeps its distinct ids only
(a dozen or so for a few dozen draws), each with its count.

Decoded rows are [N, draws]: ids int64 and counts int32, the distinct ids first, in
*sample order* (count descending, ties by ascending id), then padding (id -1, count 0).
Both components store the entries in the ids codec's order (ascending rank in a
per-document dictionary, as ``GapIds``), and the facade restores sample order.

``ids: sampled`` holds the sampling parameters: ``draws`` (samples per position, the
width of the rows), ``temperature`` (the teacher's logits are divided by it before
sampling) and ``seed`` (with a document's id it seeds that document's generator, so a
capture and its resumption draw the same samples). Only ``draws`` shapes the bytes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from kdpipe.schemas import CodecError, ConfigError

from . import entropy
from .base import IDS, VALUES, Capabilities, ValuesCodec, register, sort_rows
from .ids import GapIds

SIGNAL = "sampled"


def sample_order(ids: torch.Tensor, counts: torch.Tensor, vocab_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (ids, counts), padding (-1, 0) anywhere -> sample order: count descending,
    ties by ascending id, padding last. One sort of int64 keys ``(draws - count, id + 1)``
    (in numpy on the CPU: its SIMD sort is several times torch's there)."""
    draws = ids.shape[-1]
    bits = vocab_size.bit_length()                 # id + 1 <= vocab_size
    if ids.device.type == "cpu":
        key = draws - counts.numpy().astype(np.int64)
        key <<= bits
        key |= ids.numpy() + 1
        key.sort(axis=-1)
        out_ids = (key & ((1 << bits) - 1)) - 1
        key >>= bits
        return torch.from_numpy(out_ids), torch.from_numpy((draws - key).astype(np.int32))
    key = ((draws - counts.long()) << bits) | (ids.long() + 1)
    key = torch.sort(key, dim=-1).values
    return (key & ((1 << bits) - 1)) - 1, (draws - (key >> bits)).int()


def _check_left_packed(valid: np.ndarray, what: str) -> np.ndarray:
    """Row sizes of a [N, draws] validity mask whose valid entries come first."""
    if valid.shape[1] > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise CodecError(f"{what}: a row has an entry after its padding")
    sizes = valid.sum(1)
    if sizes.size and int(sizes.min()) < 1:
        raise CodecError(f"{what}: row {int(np.argmin(sizes))} holds no sample")
    return sizes


@register(IDS, "sampled")
class SampledIds(GapIds):
    """Each row's distinct sampled ids as ascending gaps of their per-document dictionary
    ranks (``GapIds``' dictionary), plus every row's number of distinct ids.

    Blob: the ``KDE2`` container (k = draws) with four symbol streams: the dictionary's id
    gaps, its count classes, each row's size - 1, and the rows' rank gaps concatenated.
    """

    capabilities = Capabilities(lossless=True, rank_order=False, entropy_coded=True,
                                signal=SIGNAL)

    def __init__(self, params: dict[str, Any], *, vocab_size: int, k: int) -> None:
        self.params, self.vocab_size, self.k = params, vocab_size, k
        unknown = sorted(set(params) - {"draws", "temperature", "seed", "level"})
        if unknown:
            raise ConfigError(f"ids sampled: unknown parameters {unknown}")
        draws = params.get("draws")
        if not isinstance(draws, int) or isinstance(draws, bool) or not 1 <= draws <= 65535:
            raise ConfigError(f"ids sampled: draws must be an integer in [1, 65535], "
                              f"got {draws!r}")
        temperature = params.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"ids sampled: temperature must be a positive number, "
                              f"got {temperature!r}")
        seed = params.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"ids sampled: seed must be a non-negative integer, got {seed!r}")
        if k != draws:
            raise ConfigError(f"ids sampled: the codec draws {draws} samples per position but "
                              f"the data holds rows of {k} (samples cannot be re-drawn from "
                              f"stored samples)")
        self.draws, self.temperature, self.seed = draws, float(temperature), seed
        self.level = entropy.check_level(params.get("level", 1), "ids sampled")
        self.tag = entropy.params_tag("ids.sampled", {"draws": draws})
        self.n_streams = 4

    def encode(self, ids: np.ndarray) -> bytes:
        return self.encode_ordered(ids)[0]

    def encode_ordered(self, ids: np.ndarray, carry: np.ndarray | None = None,
                       carry_bound: int = 0) -> tuple[bytes, np.ndarray]:
        """[N, draws] ids, each row's distinct ids first (any order) then -1 -> (bytes, the
        stored order as ``carry`` moved into it, by default the column permutation)."""
        ids = np.asarray(ids, dtype=np.int64)
        what = "ids sampled"
        valid = ids >= 0
        sizes = _check_left_packed(valid, what)
        flat = ids[valid]
        if flat.size and int(flat.max()) >= self.vocab_size:
            raise CodecError(f"{what}: token id {int(flat.max())} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        dictionary, classes, ranks = self._dictionary(flat)
        padded = np.full(ids.shape, len(dictionary), np.int64)   # padding sorts last
        padded[valid] = ranks
        stored, carried = sort_rows(padded, len(dictionary) + 1, carry, carry_bound)
        entries = stored[valid]            # valid entries stay first in every stored row
        previous = np.empty_like(entries)
        previous[1:] = entries[:-1]
        previous[np.cumsum(sizes) - sizes] = -1
        rank_gaps = entries - previous - 1
        if rank_gaps.size and int(rank_gaps.min()) < 0:
            raise CodecError(f"{what}: a row holds the same id twice")
        return entropy.pack_container(self.tag, ids.shape[0], self.k, [
            entropy.encode_symbols(np.diff(dictionary, prepend=-1) - 1, self.level),
            entropy.encode_symbols(classes, self.level),
            entropy.encode_symbols(sizes - 1, self.level),
            entropy.encode_symbols(rank_gaps, self.level)]), carried

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        what = "ids sampled"
        cpu = torch.device("cpu")
        docs = entropy.unpack_documents(blobs, rows, self.tag, self.k, self.n_streams, what)
        sizes, _ = entropy.decode_symbols([d[2] for d in docs], list(rows), cpu,
                                          f"{what} row sizes")
        sizes = sizes.numpy().astype(np.int64) + 1
        if sizes.size and int(sizes.max()) > self.draws:
            raise CodecError(f"{what}: a row holds more than {self.draws} ids (corrupt data)")
        row_doc = np.repeat(np.arange(len(rows)), list(rows))
        per_doc = np.bincount(row_doc, weights=sizes, minlength=len(rows)).astype(np.int64)
        gaps, _ = entropy.decode_symbols([d[3] for d in docs], per_doc.tolist(), cpu, what)
        table, starts, dict_sizes = self._dictionaries(docs, rows, cpu, what)
        row_end = np.cumsum(sizes)
        row_start = row_end - sizes
        steps = np.cumsum(gaps.numpy().astype(np.int64) + 1)
        before = np.concatenate([[0], steps])[row_start]
        entry_row = np.repeat(np.arange(len(sizes)), sizes)
        rank = steps - before[entry_row] - 1
        entry_doc = row_doc[entry_row]
        if rank.size and bool((rank >= dict_sizes.numpy()[entry_doc]).any()):
            raise CodecError(f"{what}: a row refers past its document's dictionary "
                             f"(corrupt data)")
        out = np.full((len(sizes), self.draws), -1, np.int64)
        out[entry_row, np.arange(rank.size) - row_start[entry_row]] = \
            table.numpy()[rank + starts.numpy()[entry_doc]]
        return torch.from_numpy(out).to(device)


@register(VALUES, "counts")
class CountValues(ValuesCodec):
    """Each sampled id's count, in the ids codec's order: one symbol stream of ``count - 1``
    over the rows' entries; a row ends where its counts add up to ``draws`` (k), so the
    stream needs no row sizes. Decoded as float32 [N, draws], 0 after a row's entries."""

    capabilities = Capabilities(lossless=True, entropy_coded=True, signal=SIGNAL)

    def __init__(self, params: dict[str, Any], *, k: int) -> None:
        super().__init__(params, k=k)
        unknown = sorted(set(params) - {"level"})
        if unknown:
            raise ConfigError(f"values counts: unknown parameters {unknown}")
        self.level = entropy.check_level(params.get("level", 1), "values counts")
        self.tag = entropy.params_tag("values.counts", {})

    def encode(self, values: np.ndarray) -> bytes:
        what = "values counts"
        counts = np.asarray(values)
        if counts.dtype.kind == "f":
            if not np.array_equal(counts, np.round(counts)):
                raise CodecError(f"{what}: counts must be whole numbers")
        counts = counts.astype(np.int64)
        _check_left_packed(counts > 0, what)
        if counts.size and (int(counts.min()) < 0 or
                            bool((counts.sum(1) != self.k).any())):
            raise CodecError(f"{what}: every row's counts must add up to the {self.k} draws")
        return entropy.pack_container(self.tag, counts.shape[0], self.k, [
            entropy.encode_symbols(counts[counts > 0] - 1, self.level)])

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        what = "values counts"
        docs = entropy.unpack_documents(blobs, rows, self.tag, self.k, 1, what)
        flat, lengths = entropy.decode_symbols([d[0] for d in docs], None, torch.device("cpu"),
                                               what, limits=[n * self.k for n in rows])
        counts = flat.numpy().astype(np.int64) + 1
        n_rows = int(sum(rows))
        out = np.zeros((n_rows, self.k), np.float32)
        pos = r0 = 0
        for doc, (n, length) in enumerate(zip(rows, lengths)):
            c = counts[pos:pos + length]
            cum = np.cumsum(c)
            ends = np.searchsorted(cum, self.k * np.arange(1, n + 1))
            if n and (int(ends[-1]) != length - 1 or
                      not np.array_equal(cum[np.minimum(ends, max(length - 1, 0))],
                                         self.k * np.arange(1, n + 1))):
                raise CodecError(f"{what} document {doc}: counts do not add up to {self.k} "
                                 f"draws per row (corrupt data)")
            if not n and length:
                raise CodecError(f"{what} document {doc}: counts for no rows (corrupt data)")
            starts = np.concatenate([[0], ends[:-1] + 1]) if n else ends
            sizes = ends - starts + 1
            row = np.repeat(np.arange(n), sizes)
            out[r0 + row, np.arange(length) - starts[row]] = c
            pos += length
            r0 += n
        return torch.from_numpy(out).to(device)

    def decode_with_tail(self, blobs: Sequence[bytes], rows: Sequence[int],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        raise CodecError("values counts: sampled rows have no missing mass")
