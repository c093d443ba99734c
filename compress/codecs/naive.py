"""Readable references for the vectorized codecs: per-element loops, plain Python math.

Slow on purpose; tests compare the fast paths against these on small inputs.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from .grid import LOG_FLOOR_NATS


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Each row's fields as a string of bits, MSB first, zero-padded to a byte."""
    out = []
    for row in np.asarray(values):
        s = "".join(format(int(v), f"0{bits}b") for v in row)
        s += "0" * (-len(s) % 8)
        out.append([int(s[i:i + 8], 2) for i in range(0, len(s), 8)])
    return np.array(out, dtype=np.uint8).reshape(len(out), -1)


def unpack_rows(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    out = []
    for row in np.asarray(data):
        s = "".join(format(int(b), "08b") for b in row)
        out.append([int(s[i * bits:(i + 1) * bits], 2) for i in range(n)])
    return np.array(out, dtype=np.int64).reshape(len(out), n)


def grid_quantize(logprob: float, transform: str, step: float) -> int:
    lp = min(float(logprob), 0.0)
    top = round((1.0 if transform == "sqrt" else LOG_FLOOR_NATS) / step)
    if transform == "sqrt":
        return min(round(math.exp(lp / 2) / step), top)
    return min(round(min(-lp, LOG_FLOOR_NATS) / step), top)


def grid_logprob(q: int, transform: str, step: float) -> float:
    """Decoded log-prob of grid index ``q``: sqrt bins decode to their mean probability."""
    if transform == "sqrt":
        return math.log(min(step * step * (q * q + 1 / 12), 1.0))
    return -q * step


def dictionary_ranks(doc_ids: np.ndarray) -> dict[int, int]:
    """The ``gaps`` codec's dictionary order: count class descending, then id."""
    counts: dict[int, int] = {}
    for i in np.asarray(doc_ids).reshape(-1).tolist():
        counts[i] = counts.get(i, 0) + 1
    order = sorted(counts, key=lambda i: (-int(math.floor(math.log2(counts[i]))), i))
    return {i: r for r, i in enumerate(order)}


def poly_decode_row(row: bytes, *, k: int, exact_k: int, exact_fmt: str, terms: list,
                    term_fmt: str, bins: list[tuple[str, int, int]], delta: bool) -> list[float]:
    """One ``poly`` row -> k log-probs, in Python floats (float64).

    ``exact_fmt``/``term_fmt`` and each bin's scale format are ``struct`` codes ('e' for
    float16, 'f', 'd'); bins are (scale format, element_bits, num_elements).
    """
    pos = 0

    def take(fmt: str, count: int) -> list[float]:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        vals = list(struct.unpack_from(f"<{count}{fmt}", row, pos))
        pos += size * count
        return vals

    exact = take(exact_fmt, exact_k)
    coeffs = take(term_fmt, len(terms))
    n = k - exact_k
    tail = []
    for j in range(n):
        t = j / (n - 1) if n > 1 else 0.0
        x = 2 * t - 1
        tail.append(sum(c * (math.sqrt(t) if term == "sqrt" else math.exp(t) if term == "exp"
                             else x ** term) for c, term in zip(coeffs, terms)))
    col = 0
    for scale_fmt, bits, count in bins:
        (scale,) = take(scale_fmt, 1)
        nbytes = (bits * count + 7) // 8
        bitstr = "".join(format(b, "08b") for b in row[pos:pos + nbytes])
        pos += nbytes
        for i in range(count):
            q = int(bitstr[i * bits:(i + 1) * bits], 2)
            tail[col] += (2 * q - 1) * scale if bits == 1 else (q - 2 ** (bits - 1)) * scale
            col += 1
    values = exact + tail
    if delta:
        values = list(np.cumsum(values))
    return values
