"""Interfaces of the three codec components and their registry.

Encoders take one document's rows (numpy on the CPU, the capture side); decoders take
the blobs of many documents at once and return torch tensors on the requested device,
so a training batch is decoded in a handful of vectorized operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kdpipe.schemas import CodecError, ConfigError


@dataclass(frozen=True)
class Capabilities:
    """What a codec component does, declared by its class (and refined by an instance whose
    parameters change it), so that callers read it instead of inferring it from kind names or
    methods. tests/test_codec_components.py checks every registered kind against it."""

    #: decode(encode(x)) == x, in the component's stored order: data it holds can serve as
    #: the exact reference (fidelity).
    lossless: bool = False
    #: ids: rows are stored in rank order (descending probability). Otherwise in an order of
    #: the codec's own (``encode_ordered`` gives the permutation); the values are stored in
    #: the same order and the facade restores rank order from them.
    rank_order: bool = True
    #: The encoded bytes are entropy-coded already (zstd inside the codec), so the dataset
    #: writer stores them without Parquet compression on top.
    entropy_coded: bool = False
    #: values: every row's missing mass ``1 - sum(p)`` is stored (``decode_with_tail`` reads
    #: it); otherwise it is derived from the decoded values.
    stores_missing_mass: bool = False
    #: hidden: the parameter naming a dataset artifact fitted on captured hidden states (the
    #: low-rank projection); encoding needs it fitted first. None: no side data.
    side_data: str | None = None
    #: Which teacher signal the component stores: ``topk`` (ranked top-k rows with their
    #: log-probs) or ``sampled`` (each row's distinct ids drawn from the teacher with their
    #: counts; ``compress/codecs/sampled.py``). A codec's ids and values must agree.
    signal: str = "topk"


class IdsCodec(ABC):
    """Top-k token ids of a run of positions."""

    capabilities = Capabilities()

    def __init__(self, params: dict[str, Any], *, vocab_size: int, k: int) -> None:
        self.params, self.vocab_size, self.k = params, vocab_size, k

    @abstractmethod
    def encode(self, ids: np.ndarray) -> bytes:
        """[N, k] int64, in this codec's order -> bytes."""

    def encode_ordered(self, ids: np.ndarray, carry: np.ndarray | None = None,
                       carry_bound: int = 0) -> tuple[bytes, np.ndarray | None]:
        """[N, k] rank-ordered ids -> (bytes, ``carry`` [N, k] (integers in
        [0, carry_bound)) moved into the stored order), or None when the rank order is
        kept. ``carry`` defaults to the column index, which yields the permutation the
        values must follow."""
        if self.capabilities.rank_order:
            return self.encode(ids), None
        ordered, carried = sort_rows(ids, int(ids.max()) + 1 if ids.size else 1,
                                     carry, carry_bound)
        return self.encode(ordered), carried

    @abstractmethod
    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        """Blobs of several documents -> [sum(rows), k] integer ids (int32 or int64; the
        facade returns int64) in this codec's order, every id < vocab_size."""


class ValuesCodec(ABC):
    """Log-probabilities of the top-k of a run of positions."""

    capabilities = Capabilities()

    def __init__(self, params: dict[str, Any], *, k: int) -> None:
        self.params, self.k = params, k

    @abstractmethod
    def encode(self, values: np.ndarray) -> bytes:
        """[N, k] float32 (in the ids codec's order) -> bytes."""

    @abstractmethod
    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        """Blobs of several documents -> [sum(rows), k] float32."""

    def decode_with_tail(self, blobs: Sequence[bytes], rows: Sequence[int],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and every row's missing mass ``1 - sum(exp(values))`` [sum(rows)].

        Codecs that store the mass (``capabilities.stores_missing_mass``) override this; the
        default derives it from the decoded values, which is exact for lossless codecs.
        """
        values = self.decode(blobs, rows, device)
        return values, tail_from_values(values)

    #: For codecs that store integer indices (a grid): indices lie in [0, index_bound), and
    #: such a codec also has ``quantize(values)`` -> (int32 [N, k] indices, per-row side
    #: data or None) and ``encode_indices(indices, side)`` -> bytes, with ``encode`` their
    #: composition. The facade then quantizes in rank order and lets the ids codec carry
    #: the indices into its order inside its sort keys, instead of gathering the float
    #: values by a permutation. None for other codecs.
    index_bound: int | None = None

    #: For codecs whose decoded values are a strictly decreasing table of small integer
    #: "rank ordinals": ``ordinal_levels[r]`` is the float32 log-prob of ordinal r. Such a
    #: codec also has ``decode_ordinals(blobs, rows, device, with_tail)`` -> (int32 [N, k]
    #: ordinals, checked to index the table; the missing mass [N] or None), and the facade
    #: restores rank order with one sort of integer (ordinal, id) keys, with the same order
    #: and ties as sorting the decoded values. None for other codecs.
    ordinal_levels: torch.Tensor | None = None


def tail_from_values(values: torch.Tensor) -> torch.Tensor:
    """[N, k] log-probs -> [N] float32 probability mass outside them (float64 sum)."""
    return (1.0 - values.double().exp().sum(dim=1)).clamp(min=0.0).float()


class HiddenCodec(ABC):
    """Hidden states [T, H] of one layer.

    ``layer`` tells codecs with per-layer side data (a low-rank projection) which layer
    the states belong to; ``artifacts`` loads such side data from the dataset by relative
    path. Codecs without side data ignore both.
    """

    capabilities = Capabilities()
    #: ``encode_tensor`` computes on the input's device (else on the host, whatever it gets)
    encodes_on_device = False

    def __init__(self, params: dict[str, Any], *, hidden_size: int, dtype: torch.dtype,
                 artifacts: Callable[[str], bytes] | None = None) -> None:
        self.params, self.hidden_size, self.dtype = params, hidden_size, dtype
        self.artifacts = artifacts

    @abstractmethod
    def encode_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        """[T, H] in the teacher's dtype -> its encoded bytes as a 1-D uint8 host array of its
        own (the dataset writer hands these to Arrow without copying them into bytes)."""

    def encode(self, x: torch.Tensor, layer: int | None = None) -> bytes:
        return self.encode_array(x, layer).tobytes()

    def encode_tensor(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``encode_array``'s bytes as a 1-D uint8 tensor, left on ``x``'s device when the codec
        encodes there, so a caller copies them out when it chooses (capture: asynchronously,
        into the writer process's shared memory). The default encodes on the host."""
        return torch.from_numpy(self.encode_array(x, layer))

    @abstractmethod
    def decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
               layer: int | None = None) -> torch.Tensor:
        """Blobs of several documents -> [sum(rows), H] float32."""


IDS: dict[str, type[IdsCodec]] = {}
VALUES: dict[str, type[ValuesCodec]] = {}
HIDDEN: dict[str, type[HiddenCodec]] = {}


def register(table: dict, kind: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if kind in table:
            raise ValueError(f"codec kind {kind!r} registered twice")
        table[kind] = cls
        return cls
    return deco


def lookup(table: dict, kind: str, what: str) -> type:
    if kind not in table:
        raise ConfigError(f"unknown {what} codec {kind!r}; known: {sorted(table)}")
    return table[kind]


def sort_rows(x: np.ndarray, bound: int, carry: np.ndarray | None = None,
              carry_bound: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of integers in [0, bound) -> (each row ascending, ``carry``'s entries moved
    with them; ties by carry). ``carry`` (integers in [0, carry_bound)) defaults to the
    column index: then it comes out as the permutation that sorts each row, ties by
    column.

    Sorts one integer key per entry, ``x << s | carry`` with ``s`` the bits of
    ``carry_bound - 1``, instead of calling argsort and gathering: numpy's SIMD sort is ~3x
    faster, and both come out of the sorted keys; int32 keys (when ``bound << s`` fits in
    31 bits) sort ~2.5x faster than int64.
    """
    k = x.shape[1]
    if carry is None:
        carry, carry_bound = np.arange(k), k
    elif carry.size and not 0 <= int(carry.min()) <= int(carry.max()) < carry_bound:
        raise ValueError(f"carried values must lie in [0, {carry_bound})")
    shift = max(1, (carry_bound - 1).bit_length())
    if (bound - 1).bit_length() + shift > 63:
        raise ValueError(f"sort keys of {bound} x {carry_bound} do not fit in 63 bits")
    dtype = np.int32 if bound << shift <= 1 << 31 else np.int64
    keys = x.astype(dtype) << shift
    keys |= carry
    keys.sort(axis=1)
    carried = keys & ((1 << shift) - 1)
    keys >>= shift
    return keys, carried


def fixed_width_concat(blobs: Sequence[bytes], rows: Sequence[int], row_bytes: int,
                       what: str) -> bytes:
    """Concatenate per-document blobs of a fixed-width encoding, checking every length."""
    for i, (b, n) in enumerate(zip(blobs, rows)):
        if len(b) != n * row_bytes:
            raise CodecError(f"{what}: document {i} has {len(b)} bytes, expected "
                             f"{n} rows x {row_bytes} = {n * row_bytes}")
    return b"".join(blobs)


def tensor_from_bytes(data: bytes, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-copy view of bytes as a tensor, moved to ``device``."""
    if not data:
        return torch.empty(0, dtype=dtype, device=device)
    t = torch.frombuffer(bytearray(data), dtype=dtype)
    return t.to(device, non_blocking=True)


def check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> torch.Tensor:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise CodecError(f"{what}: token id {bad} outside the vocabulary [0, {vocab_size})")
    return ids
