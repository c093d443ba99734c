"""The codec facade that capture (encoding) and training (decoding) call.

``Codec`` binds a ``CodecConfig`` to the dataset's dimensions (vocabulary, captured k,
hidden size and dtype) and handles the part every codec shares: truncating k, the
id-order permutation some id codecs use, and restoring rank order on decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kdpipe.runtime import torch_dtype
from kdpipe.schemas import CodecConfig, CodecError, ConfigError
from kdpipe.schemas.convert import load_file

from .codecs import HIDDEN, IDS, VALUES
from .codecs.base import lookup
from .codecs.sampled import sample_order

PRESET_DIR = Path(__file__).parent / "presets"

def _hidden_dtype(name: str) -> torch.dtype:
    try:
        return torch_dtype(name)
    except ValueError as e:
        raise ConfigError(f"hidden states: {e}") from e


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_codec_config(name_or_path: str) -> CodecConfig:
    """A preset name (``exact``, ``default``...) or a YAML/JSON file."""
    path = Path(name_or_path)
    if not path.suffix and (PRESET_DIR / f"{name_or_path}.yaml").exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    elif not path.exists():
        raise ConfigError(f"codec {name_or_path!r} is neither a preset "
                          f"({', '.join(preset_names())}) nor an existing file")
    data = load_file(path)
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    config = CodecConfig.from_dict(data, str(path))
    check_signals(config)
    return config


def check_signals(config: CodecConfig) -> None:
    """Refuse ``dense: true`` with sampled ids. A dense dataset already rebuilds the teacher's
    whole distribution at every position, so draws from it would store a noisy copy of what
    the rows hold exactly; the dense codecs keep top-k rows beside it."""
    if config.dense and signal_of(config) != "topk":
        raise ConfigError(f"codec {config.name!r}: dense: true keeps the teacher's full "
                          f"distribution beside top-k rows, and ids {config.ids.kind!r} store "
                          f"the {signal_of(config)} signal instead; use a dense preset "
                          f"(dense-bf16, dense-fp8, dense-exact) or a sampled codec without "
                          f"dense")


def side_data_param(config: CodecConfig) -> str | None:
    """The hidden codec's parameter naming its fitted side data (an artifact), or None."""
    return lookup(HIDDEN, config.hidden.kind, "hidden").capabilities.side_data


def needs_fitting(config: CodecConfig) -> bool:
    """Whether the hidden codec's side data must still be fitted on captured hidden states
    before anything can be encoded with ``config``."""
    param = side_data_param(config)
    return param is not None and param not in config.hidden.params


def signal_of(config: CodecConfig) -> str:
    """The teacher signal a codec configuration stores: ``topk`` or ``sampled``."""
    return lookup(IDS, config.ids.kind, "ids").capabilities.signal


def sampling_of(config: CodecConfig) -> tuple[int, float, int] | None:
    """(draws, temperature, seed) of a ``sampled`` codec configuration, else None."""
    if signal_of(config) != "sampled":
        return None
    p = config.ids.params
    return p.get("draws"), float(p.get("temperature", 1.0)), p.get("seed", 0)


def check_recode(source: CodecConfig, target: CodecConfig, where: str) -> None:
    """Whether data encoded with ``source`` can be re-encoded with ``target``: top-k into
    top-k; samples into samples drawn the same way (same draws, temperature and seed: the
    stored draws are the data). Samples drawn from a stored top-k would come from the
    truncated, renormalized distribution, not the teacher's, so top-k never becomes samples."""
    have, want = sampling_of(source), sampling_of(target)
    if have is None and want is not None:
        raise ConfigError(f"{where}: holds top-k rows; the {target.name!r} codec stores ids "
                          f"sampled from the teacher's full distribution, which a top-k "
                          f"cannot give without bias; capture with --codec {target.name}")
    if have is not None and want is None:
        raise ConfigError(f"{where}: holds the sampled teacher signal, which has no top-k to "
                          f"store with {target.name!r}; use a codec with ids kind sampled")
    if have is not None and have != want:
        raise ConfigError(f"{where}: holds {have[0]} draws per position at temperature "
                          f"{have[1]:g} with seed {have[2]}; codec {target.name!r} asks for "
                          f"{want[0]} at {want[1]:g} with seed {want[2]}, and stored samples "
                          f"cannot be re-drawn")


def rank_sort(ids: torch.Tensor, lps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (ids, log-probs) in any order -> rank order: descending log-prob, ties by
    ascending id (int64 ids, float32 log-probs).

    Each entry becomes one int64 key whose ascending order is rank order: the float32
    bits mapped to an order-preserving integer (negative floats have their magnitude bits
    flipped) and negated, in the high word, the id in the low word. Sorting the keys
    alone sorts both, and both are read back out of the sorted keys. On the CPU this runs
    in numpy, in place (its SIMD sort is ~8x torch's CPU sort on rows of 128); on other
    devices in torch.
    """
    if ids.device.type == "cpu":
        out_ids, out_lps = _rank_sort_numpy(ids.numpy(), lps.float().numpy())
        return torch.from_numpy(out_ids), torch.from_numpy(out_lps)
    return _rank_sort_torch(ids, lps)


def _rank_sort_numpy(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    key = np.ascontiguousarray(lps, dtype=np.float32).view(np.int32).astype(np.int64)
    np.bitwise_xor(key, 0x7FFFFFFF, out=key, where=key < 0)
    np.negative(key, out=key)
    np.left_shift(key, 32, out=key)
    np.bitwise_or(key, ids, out=key, casting="unsafe")
    key.sort(axis=1)
    value = np.negative(key.view(np.int32)[:, 1::2])   # the high words (little-endian)
    np.bitwise_xor(value, 0x7FFFFFFF, out=value, where=value < 0)
    np.bitwise_and(key, 0xFFFFFFFF, out=key)
    return key, value.view(np.float32)


def _rank_sort_torch(ids: torch.Tensor, lps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = lps.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = ordered.neg_().long().bitwise_left_shift_(32).bitwise_or_(ids)
    key = torch.sort(key, dim=1).values
    ordered = (key >> 32).int().neg_()
    ordered = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return key.bitwise_and_(0xFFFFFFFF), ordered.view(torch.float32)


def rank_sort_ordinals(ids: torch.Tensor, ordinals: torch.Tensor, levels: torch.Tensor,
                       vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_sort`` for values given as rank ordinals (``levels[ordinal]`` is the log-prob,
    strictly decreasing): the same order and ties, from one sort of integer keys
    (ordinal, id), int32 where they fit in 31 bits (numpy's SIMD sort on the CPU runs
    rows of 128 int32 keys ~2.5x faster than int64 ones)."""
    id_bits = max(1, (vocab_size - 1).bit_length())
    wide = id_bits + max(1, (levels.numel() - 1).bit_length()) > 31
    mask = (1 << id_bits) - 1
    if ids.device.type == "cpu":   # numpy: its sort, masks and gathers are the faster here
        key = ordinals.numpy().astype(np.int64 if wide else np.int32)
        key <<= id_bits
        key |= ids.numpy().astype(key.dtype, copy=False)
        key.sort(axis=1)
        out_ids = np.bitwise_and(key, mask, dtype=np.int64)
        key >>= id_bits
        # torch's index_select gathers from the small table ~2x faster than np.take
        return torch.from_numpy(out_ids), \
            levels.index_select(0, torch.from_numpy(key).view(-1)).view(key.shape)
    dtype = torch.int64 if wide else torch.int32
    key_t = ordinals.to(dtype).bitwise_left_shift_(id_bits).bitwise_or_(ids.to(dtype))
    key_t = torch.sort(key_t, dim=1).values
    return (key_t & mask).long(), levels.to(key_t.device)[key_t >> id_bits]


class Codec:
    def __init__(self, config: CodecConfig, *, vocab_size: int, top_k: int, hidden_size: int,
                 hidden_dtype: str, artifacts: Callable[[str], bytes] | None = None) -> None:
        """``artifacts`` reads a file of the dataset by relative path; only codecs with side
        data (the low-rank hidden codec's projection) use it, and only when they run."""
        if config.top_k is not None and config.top_k > top_k:
            raise ConfigError(f"codec {config.name!r} keeps top_k={config.top_k} but the data "
                              f"has only k={top_k}")
        self.config = config
        self.vocab_size = vocab_size
        self.k = config.top_k or top_k
        self.ids = lookup(IDS, config.ids.kind, "ids")(
            config.ids.params, vocab_size=vocab_size, k=self.k)
        self.values = lookup(VALUES, config.values.kind, "values")(config.values.params, k=self.k)
        self.hidden = lookup(HIDDEN, config.hidden.kind, "hidden")(
            config.hidden.params, hidden_size=hidden_size, dtype=_hidden_dtype(hidden_dtype),
            artifacts=artifacts)
        check_signals(config)
        if self.ids.capabilities.signal != self.values.capabilities.signal:
            raise ConfigError(f"codec {config.name!r}: ids {config.ids.kind!r} store the "
                              f"{self.ids.capabilities.signal} signal but values "
                              f"{config.values.kind!r} the {self.values.capabilities.signal} one")

    @property
    def signal(self) -> str:
        """``topk`` (``encode_rows``/``decode_rows``) or ``sampled`` (``encode_samples``/
        ``decode_samples``)."""
        return self.ids.capabilities.signal

    def _require(self, signal: str) -> None:
        if self.signal != signal:
            raise CodecError(f"codec {self.config.name!r} stores the {self.signal} teacher "
                             f"signal, not the {signal} one")

    @property
    def stores_tail(self) -> bool:
        """Whether the values carry every row's missing mass (``decode_rows_with_tail``
        returns it as stored rather than recomputed from the decoded values)."""
        return self.values.capabilities.stores_missing_mass

    def encode_rows(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[bytes, bytes]:
        """[N, k_captured] rank-ordered ids and log-probs -> (ids bytes, values bytes)."""
        self._require("topk")
        ids = np.ascontiguousarray(np.asarray(ids)[:, : self.k], dtype=np.int64)
        lps = np.asarray(logprobs, dtype=np.float32)[:, : self.k]
        # one pass: negative ids are huge as unsigned
        if ids.size and int(ids.view(np.uint64).max()) >= self.vocab_size:
            raise CodecError(f"token id outside the vocabulary [0, {self.vocab_size}) "
                             f"given to the encoder")
        if self.ids.capabilities.rank_order:
            return self.ids.encode(ids), self.values.encode(lps)
        bound = self.values.index_bound
        if bound is not None and \
                (self.vocab_size - 1).bit_length() + (bound - 1).bit_length() <= 63:
            indices, side = self.values.quantize(lps)   # carried through the id sort
            ids_bytes, indices = self.ids.encode_ordered(ids, indices, bound)
            return ids_bytes, self.values.encode_indices(indices, side)
        ids_bytes, perm = self.ids.encode_ordered(ids)
        # flat take: several times faster than take_along_axis
        lps = np.take(lps.reshape(-1), perm + np.arange(0, perm.size, self.k)[:, None])
        return ids_bytes, self.values.encode(lps)

    def decode_rows(self, ids_blobs: Sequence[bytes], values_blobs: Sequence[bytes],
                    rows: Sequence[int], device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blobs of several documents -> ([N, k] int64 ids, [N, k] float32 log-probs) in rank
        order."""
        return self._decode(ids_blobs, values_blobs, rows, torch.device(device), False)[:2]

    def decode_rows_with_tail(self, ids_blobs: Sequence[bytes], values_blobs: Sequence[bytes],
                              rows: Sequence[int], device: torch.device | str = "cpu"
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``decode_rows`` plus every row's missing mass ``1 - sum(p)`` [N] (float32): as
        stored by codecs that keep it, else computed from the decoded values."""
        return self._decode(ids_blobs, values_blobs, rows, torch.device(device), True)

    def _decode(self, ids_blobs: Sequence[bytes], values_blobs: Sequence[bytes],
                rows: Sequence[int], device: torch.device, with_tail: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self._require("topk")
        ids = self.ids.decode(ids_blobs, rows, device)
        if not self.ids.capabilities.rank_order and self.values.ordinal_levels is not None:
            ordinals, tail = self.values.decode_ordinals(values_blobs, rows, device, with_tail)
            self._check_shapes(ids, ordinals)
            return (*rank_sort_ordinals(ids, ordinals, self.values.ordinal_levels,
                                        self.vocab_size), tail)
        if with_tail:
            lps, tail = self.values.decode_with_tail(values_blobs, rows, device)
        else:
            lps, tail = self.values.decode(values_blobs, rows, device), None
        self._check_shapes(ids, lps)
        if not self.ids.capabilities.rank_order:
            return (*rank_sort(ids, lps), tail)
        return ids.long(), lps, tail

    def encode_samples(self, ids: np.ndarray, counts: np.ndarray) -> tuple[bytes, bytes]:
        """[N, draws] sampled ids and counts (each row's distinct ids first, then id -1 with
        count 0) -> (ids bytes, values bytes)."""
        self._require("sampled")
        ids = np.asarray(ids, dtype=np.int64)
        counts = np.asarray(counts)
        if ids.ndim != 2 or ids.shape != counts.shape or ids.shape[1] != self.k:
            raise CodecError(f"sampled ids {ids.shape} and counts {counts.shape}: expected "
                             f"[rows, {self.k}] each")
        if bool(((ids < 0) != (counts == 0)).any()):
            raise CodecError("sampled rows: padding (id -1) and zero counts disagree")
        ids_bytes, perm = self.ids.encode_ordered(ids)
        return ids_bytes, self.values.encode(np.take_along_axis(counts, perm, 1))

    def decode_samples(self, ids_blobs: Sequence[bytes], values_blobs: Sequence[bytes],
                       rows: Sequence[int], device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blobs of several documents -> ([N, draws] int64 ids, [N, draws] int32 counts) in
        sample order (count descending, ties by id), padded with id -1 and count 0."""
        self._require("sampled")
        ids = self.ids.decode(ids_blobs, rows, torch.device("cpu"))
        counts = self.values.decode(values_blobs, rows, torch.device("cpu")).int()
        self._check_shapes(ids, counts)
        if not torch.equal(ids < 0, counts == 0):
            raise CodecError("sampled rows: ids and counts disagree on a row's size "
                             "(corrupt data)")
        ids, counts = sample_order(ids, counts, self.vocab_size)
        return ids.to(device), counts.to(device)

    @staticmethod
    def _check_shapes(ids: torch.Tensor, values: torch.Tensor) -> None:
        if ids.shape != values.shape:
            raise CodecError(f"ids {tuple(ids.shape)} and values {tuple(values.shape)} disagree")

    def encode_hidden(self, x: torch.Tensor, layer: int | None = None) -> bytes:
        return self.hidden.encode(x, layer)

    def encode_hidden_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        """``encode_hidden`` as a 1-D uint8 array, without the copy into bytes."""
        return self.hidden.encode_array(x, layer)

    def encode_hidden_tensor(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``encode_hidden_array``'s bytes as a 1-D uint8 tensor, on ``x``'s device where the
        hidden codec encodes there (``HiddenCodec.encode_tensor``)."""
        return self.hidden.encode_tensor(x, layer)

    def decode_hidden(self, blobs: Sequence[bytes], rows: Sequence[int],
                      device: torch.device | str = "cpu", layer: int | None = None
                      ) -> torch.Tensor:
        return self.hidden.decode(blobs, rows, torch.device(device), layer)
