"""Fixed-width bit packing (1..32 bits per field), MSB first: DistillKit's id layout.

Each row of ``n`` fields is packed most significant bit first and padded with zero
bits to a whole byte, so rows keep a fixed byte length and stay individually
addressable (DistillKit's ``bytepacked_indices``, and its residual bins).

The encoder runs in numpy (the capture side), the decoder in torch on any device. Both
are vectorized: every field lies in the 5-byte big-endian window starting at its first
byte (7 bits of offset + 32 bits of field fit in 40), so the decoder gathers five
byte columns, shifts and masks, and the encoder builds each field's window and ORs
the window bytes into place. A readable per-bit reference lives in ``naive.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MAX_BITS = 32
_WINDOW = 5  # bytes read per field: 7 bits of offset + 32 bits of field fit in 40


def row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` fields of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be in [1, {MAX_BITS}], got {bits}")


def _row_layout(n: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each field of a packed row starts: (first byte [n], bit offset in it [n])."""
    offsets = np.arange(n, dtype=np.int64) * bits
    return offsets >> 3, offsets & 7


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[N, n] non-negative integers < 2**bits -> [N, row_bytes(n, bits)] uint8.

    Each field is placed in a 40-bit window starting at its first byte; the window's
    five bytes are OR-ed into the row. Fields never share a bit, so every output byte
    is the OR of a fixed, small set of window bytes, gathered in one step.
    """
    _check_bits(bits)
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected [N, n] values, got shape {values.shape}")
    if values.size and (values.min() < 0 or int(values.max()) >> bits):
        raise ValueError(f"values outside [0, 2**{bits})")
    n_rows, n = values.shape
    first, shift = _row_layout(n, bits)
    window = values.astype(np.uint64) << (_WINDOW * 8 - shift - bits).astype(np.uint64)
    # [N, n, 5] window bytes, most significant first, plus one zero column to pad with
    parts = (window[..., None] >> (8 * np.arange(_WINDOW - 1, -1, -1, dtype=np.uint64)))
    parts = np.concatenate([(parts & 0xFF).astype(np.uint8).reshape(n_rows, n * _WINDOW),
                            np.zeros((n_rows, 1), np.uint8)], axis=1)
    return np.bitwise_or.reduce(parts[:, _gather_index(n, bits)], axis=2)


@functools.lru_cache(maxsize=64)
def _gather_index(n: int, bits: int) -> np.ndarray:
    """[row_bytes, fan_in] indices into the flattened [n, 5] window bytes (plus a zero
    column at index 5n) whose OR is each output byte."""
    first, _ = _row_layout(n, bits)
    target = (first[:, None] + np.arange(_WINDOW)).reshape(-1)
    sources = [np.flatnonzero(target == j) for j in range(row_bytes(n, bits))]
    fan_in = max(len(s) for s in sources)
    return np.array([np.pad(s, (0, fan_in - len(s)), constant_values=_WINDOW * n)
                     for s in sources])


def unpack_rows(data: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """[N, row_bytes(n, bits)] uint8 -> [N, n] int64 (inverse of ``pack_rows``)."""
    _check_bits(bits)
    if data.shape[1] != row_bytes(n, bits):
        raise ValueError(f"rows have {data.shape[1]} bytes, expected {row_bytes(n, bits)}")
    padded = torch.nn.functional.pad(data, (0, _WINDOW - 1))
    first, shift = (torch.from_numpy(a).to(data.device) for a in _row_layout(n, bits))
    window = torch.zeros(data.shape[0], n, dtype=torch.int64, device=data.device)
    for i in range(_WINDOW):  # five column gathers, not a loop over fields
        window = (window << 8) | padded.index_select(1, first + i).long()
    return (window >> (_WINDOW * 8 - shift - bits)) & ((1 << bits) - 1)
