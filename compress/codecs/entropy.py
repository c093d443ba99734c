"""Entropy coding shared by the id and value codecs: symbol streams, zstd, a checked container.

A sequence of small non-negative integers is coded as one zstd frame of bytes, one
per value, with the rare values above a byte escaped (``encode_symbols``): zstd's
Huffman/FSE stages code the bytes close to their order-0 entropy. Measured on real
teacher rows this is within 1-2% of an explicit bucket + raw-bits code, and decoding
is zstd (C) plus one pass to add back the escapes.

One document's rows are coded together, so zstd sees all of its positions at once
(a 500-token document at k=128 is 64k symbols) while every document stays an
independent blob that can be decoded alone.

Container layout (little-endian)::

    magic b"KDE2" | crc32 u32 (of everything after it) | tag u32 | rows u32 | k u16 |
    n_streams u8 | n_streams x (stored length u32) | streams...

A symbol sequence is one stream: ``escapes u32 | low length u32 | zstd frame of the low
bytes | (with escapes) planes u8 | planes x (length u32) | zstd frames of the escapes'
excess, one per byte plane``.
``tag`` identifies the codec kind and parameters; a blob decoded by a different
configuration, a truncated or corrupted blob, all fail with ``CodecError``.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from typing import Any, Sequence

import numpy as np
import torch
import zstandard

from kdpipe.schemas import CodecError, CodecMismatchError, ConfigError


MAGIC = b"KDE2"
_HEAD = struct.Struct("<4sIIIHB")


# -- zstd -------------------------------------------------------------------------------

# zstd contexts cost ~15 us to create, as much as compressing a few thousand symbols,
# and are not thread-safe (capture encodes documents in a thread pool): one per thread.
_contexts = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _contexts.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_contexts, "decompressor"):
        _contexts.decompressor = zstandard.ZstdDecompressor()
    return _contexts.decompressor


def zstd_compress(data: bytes | np.ndarray, level: int) -> bytes:
    return _compressor(level).compress(data)


def zstd_decompress(data: bytes, expected: int | None, what: str, limit: int = 0) -> bytes:
    """Decompress one frame of ``expected`` bytes (None: any length up to ``limit``).

    The declared size is checked before anything is allocated, so a corrupt header
    cannot ask for gigabytes.
    """
    try:
        size = zstandard.frame_content_size(data)
        if size < 0 or (size != expected if expected is not None else size > limit):
            raise CodecError(f"{what}: stream declares {size} bytes, expected "
                             f"{expected if expected is not None else f'at most {limit}'}")
        out = _decompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: corrupt zstd stream ({e})") from e
    if len(out) != size:
        raise CodecError(f"{what}: stream holds {len(out)} bytes, its header says {size}")
    return out


def check_level(level: Any, where: str) -> int:
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ConfigError(f"{where}: zstd level must be an integer in [1, 22], got {level!r}")
    return level


# -- container --------------------------------------------------------------------------

def params_tag(kind: str, params: dict[str, Any]) -> int:
    """A 32-bit identity of a codec kind and its parameters, stored in every blob."""
    return zlib.crc32(json.dumps([kind, params], sort_keys=True).encode())


def pack_container(tag: int, rows: int, k: int, streams: Sequence[bytes]) -> bytes:
    lengths = struct.pack(f"<{len(streams)}I", *(len(s) for s in streams))
    body = struct.pack("<IIHB", tag, rows, k, len(streams)) + lengths + b"".join(streams)
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def unpack_container(blob: bytes, tag: int, rows: int, k: int, n_streams: int,
                     what: str) -> list[bytes]:
    """Check a blob's header against what the reader expects; return its streams."""
    head = _HEAD.size
    if len(blob) < head or blob[:4] != MAGIC:
        raise CodecError(f"{what}: not an entropy-coded blob (bad magic or {len(blob)} bytes)")
    _, crc, b_tag, b_rows, b_k, b_n = _HEAD.unpack_from(blob)
    if zlib.crc32(memoryview(blob)[8:]) != crc:
        raise CodecError(f"{what}: checksum mismatch (corrupt or truncated blob)")
    if b_tag != tag:
        raise CodecMismatchError(f"{what}: blob was encoded with other codec parameters "
                                 f"(tag {b_tag:08x}, reader expects {tag:08x})")
    if b_rows != rows or b_k != k or b_n != n_streams:
        raise CodecError(f"{what}: blob holds {b_rows} rows x k={b_k} in {b_n} streams, "
                         f"expected {rows} x {k} in {n_streams}")
    lengths = struct.unpack_from(f"<{n_streams}I", blob, head)
    pos = head + 4 * n_streams
    if pos + sum(lengths) != len(blob):
        raise CodecError(f"{what}: stream lengths {list(lengths)} do not add up to the blob")
    out = []
    for n in lengths:
        out.append(blob[pos:pos + n])
        pos += n
    return out


# -- symbol streams ---------------------------------------------------------------------

MAX_PLANES = 4
ESCAPE = 255
_SYMBOLS_HEAD = struct.Struct("<II")


def encode_symbols(values: np.ndarray, level: int) -> bytes:
    """Integers in [0, 2**31) -> one stream: a zstd frame of their low bytes, escapes
    for the large ones.

    Every value becomes one byte, ``min(v, 255)``; the values >= 255 (escapes) also store
    ``v - 255``, in order, as byte planes. Escapes are rare in the codecs' streams (1.9%
    of the ``default`` codec's symbols on the embedded teacher's rows), so zstd reads
    one byte per symbol instead of one per plane: half the input of plain byte planes
    for two-byte symbols, zstd ~1.2x faster to compress and ~1.3x to decompress them,
    and the streams ~2% smaller.
    """
    v = np.asarray(values).reshape(-1)
    if v.dtype.kind not in "iu":
        raise ValueError(f"symbol coding takes integers, got {v.dtype}")
    if v.dtype.kind == "i":   # negatives become huge escapes, refused below
        v = v.astype(np.int32, copy=False) if v.dtype.itemsize < 4 else v
        v = v.view(f"u{v.dtype.itemsize}")
    at = np.flatnonzero(v >= ESCAPE)
    excess = v[at] - ESCAPE
    if excess.size and int(excess.max()) > (1 << 31) - 1 - ESCAPE:
        raise ValueError("symbol coding takes integers in [0, 2**31)")
    low = v.astype(np.uint8)   # keeps the low byte; faster than a clipping minimum
    low[at] = ESCAPE
    frame = zstd_compress(low, level)
    escapes = _encode_planes(excess, level) if excess.size else b""
    return _SYMBOLS_HEAD.pack(excess.size, len(frame)) + frame + escapes


def _encode_planes(v: np.ndarray, level: int) -> bytes:
    """Non-negative integers below 2**31 -> their byte planes, each zstd-compressed."""
    planes = max(1, (int(v.max()).bit_length() + 7) // 8)
    # casting to uint8 keeps the low byte: one contiguous pass per plane
    frames = [zstd_compress((v >> (8 * i) if i else v).astype(np.uint8), level)
              for i in range(planes)]
    return struct.pack(f"<B{planes}I", planes, *(len(f) for f in frames)) + b"".join(frames)


def symbol_frames(stream: bytes, what: str) -> tuple[int, bytes, list[bytes]]:
    """A symbol stream -> (escape count, low-byte frame, the escapes' plane frames)."""
    if len(stream) < _SYMBOLS_HEAD.size:
        raise CodecError(f"{what}: truncated symbol stream")
    n_escapes, low_len = _SYMBOLS_HEAD.unpack_from(stream)
    pos = _SYMBOLS_HEAD.size + low_len
    if pos > len(stream):
        raise CodecError(f"{what}: truncated symbol stream")
    low, rest = stream[_SYMBOLS_HEAD.size:pos], stream[pos:]
    if not n_escapes:
        if rest:
            raise CodecError(f"{what}: {len(rest)} bytes after a stream without escapes")
        return 0, low, []
    if not rest or not 1 <= rest[0] <= MAX_PLANES:
        raise CodecError(f"{what}: bad escape plane count")
    planes = rest[0]
    head = 1 + 4 * planes
    if len(rest) < head:
        raise CodecError(f"{what}: truncated escape plane header")
    lengths = struct.unpack_from(f"<{planes}I", rest, 1)
    if head + sum(lengths) != len(rest):
        raise CodecError(f"{what}: escape plane lengths do not add up to the stream")
    out, pos = [], head
    for n in lengths:
        out.append(rest[pos:pos + n])
        pos += n
    return n_escapes, low, out


def decode_symbols(streams: Sequence[bytes], counts: Sequence[int] | None, device: torch.device,
                   what: str, limits: Sequence[int] = ()) -> tuple[torch.Tensor, list[int]]:
    """Symbol streams of several documents -> (int32 [total], length of each).

    ``counts[d]`` is the expected length of document d's sequence; with ``counts`` None
    each length is read from the stream, at most ``limits[d]``. zstd runs once per frame
    (in C); escapes are added back where the low bytes say 255. The frames carry no
    checksum of their own: the structure is checked here, the bytes by the container's
    crc32 (``unpack_container``), which every codec reads first.
    """
    parts = [symbol_frames(s, f"{what} document {i}") for i, s in enumerate(streams)]
    lows = [zstd_decompress(low, None if counts is None else counts[i], f"{what} document {i}",
                            limit=0 if counts is not None else limits[i])
            for i, (_, low, _) in enumerate(parts)]
    lengths = [len(low) for low in lows]
    out = np.empty(sum(lengths), np.int32)
    start = 0
    for i, ((n_escapes, _, frames), low) in enumerate(zip(parts, lows)):
        seg = out[start:start + lengths[i]]
        low = np.frombuffer(low, np.uint8)
        seg[:] = low
        at = np.flatnonzero(low == ESCAPE)
        if at.size != n_escapes:
            raise CodecError(f"{what} document {i}: {at.size} escape bytes, the stream "
                             f"declares {n_escapes} (corrupt data)")
        if n_escapes:
            excess = _decode_planes(frames, n_escapes, f"{what} document {i}")
            if int(excess.max()) > (1 << 31) - 1 - ESCAPE:
                raise CodecError(f"{what} document {i}: value beyond 2**31 (corrupt data)")
            seg[at] += excess.astype(np.int32)
        start += lengths[i]
    return torch.from_numpy(out).to(device), lengths


def _decode_planes(frames: list[bytes], count: int, what: str) -> np.ndarray:
    planes = [np.frombuffer(zstd_decompress(f, count, what), np.uint8) for f in frames]
    out = planes[-1].astype(np.int64)
    for plane in reversed(planes[:-1]):
        out <<= 8
        out |= plane
    return out


def unpack_documents(blobs: Sequence[bytes], rows: Sequence[int], tag: int, k: int,
                     n_streams: int, what: str) -> list[list[bytes]]:
    """Every document's streams, each blob checked against its expected row count."""
    if len(blobs) != len(rows):
        raise CodecError(f"{what}: {len(blobs)} blobs for {len(rows)} row counts")
    return [unpack_container(b, tag, n, k, n_streams, f"{what} document {i}")
            for i, (b, n) in enumerate(zip(blobs, rows))]
