"""Fixed-width bit packing and symbol streams: fast paths against the references."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdpipe.compress.codecs import bitpack, entropy, naive
from kdpipe.schemas import CodecError


@st.composite
def packed_case(draw):
    bits = draw(st.integers(1, 32))
    shape = draw(st.tuples(st.integers(0, 6), st.integers(1, 40)))
    values = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, (1 << bits) - 1)))
    return values, bits


@settings(max_examples=300, deadline=None)
@given(packed_case())
def test_pack_rows_matches_reference_and_round_trips(case):
    values, bits = case
    packed = bitpack.pack_rows(values, bits)
    assert packed.shape == (values.shape[0], bitpack.row_bytes(values.shape[1], bits))
    if values.shape[0]:
        np.testing.assert_array_equal(packed, naive.pack_rows(values, bits))
    unpacked = bitpack.unpack_rows(torch.from_numpy(packed), values.shape[1], bits)
    np.testing.assert_array_equal(unpacked.numpy(), values)


@pytest.mark.parametrize("bits", range(1, 33))
def test_every_width_at_its_extremes(bits):
    n = 37  # odd, so rows end mid-byte for most widths
    values = np.array([[0] * n, [(1 << bits) - 1] * n,
                       [(i * 2654435761) % (1 << bits) for i in range(n)]], dtype=np.int64)
    packed = bitpack.pack_rows(values, bits)
    np.testing.assert_array_equal(packed, naive.pack_rows(values, bits))
    np.testing.assert_array_equal(naive.unpack_rows(packed, n, bits), values)
    np.testing.assert_array_equal(bitpack.unpack_rows(torch.from_numpy(packed), n, bits).numpy(),
                                  values)


def test_pack_rows_refuses_what_does_not_fit():
    with pytest.raises(ValueError):
        bitpack.pack_rows(np.array([[4]]), 2)
    with pytest.raises(ValueError):
        bitpack.pack_rows(np.array([[1]]), 33)
    with pytest.raises(ValueError):
        bitpack.unpack_rows(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


@settings(max_examples=100, deadline=None)
@given(st.lists(hnp.arrays(np.int64, st.integers(0, 300),
                           elements=st.one_of(st.integers(250, 260),   # around the escape
                                              st.integers(0, (1 << 31) - 1))),
                min_size=1, max_size=4))
def test_symbol_streams_round_trip_across_documents(docs):
    streams = [entropy.encode_symbols(d, 3) for d in docs]
    out, lengths = entropy.decode_symbols(streams, [len(d) for d in docs],
                                          torch.device("cpu"), "test")
    assert lengths == [len(d) for d in docs]
    np.testing.assert_array_equal(out.numpy(), np.concatenate(docs))
    free, _ = entropy.decode_symbols(streams, None, torch.device("cpu"), "test",
                                     limits=[len(d) for d in docs])
    np.testing.assert_array_equal(free.numpy(), np.concatenate(docs))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_symbol_streams_refuse_negatives_and_non_integers(dtype):
    with pytest.raises(ValueError, match="integers in"):
        entropy.encode_symbols(np.array([3, -1], dtype), 1)
    with pytest.raises(ValueError, match="integers"):
        entropy.encode_symbols(np.array([1.0, 2.0]), 1)


def test_symbol_streams_refuse_corruption():
    stream = entropy.encode_symbols(np.arange(1000) * 37, 3)
    with pytest.raises(CodecError):
        entropy.decode_symbols([stream], [999], torch.device("cpu"), "test")
    with pytest.raises(CodecError):
        entropy.decode_symbols([stream[:-3]], [1000], torch.device("cpu"), "test")
    for at in (0, 4, 8, len(stream) - 1):   # escape count, low length, zstd magic, planes
        bad = bytearray(stream)
        bad[at] ^= 0xFF
        with pytest.raises(CodecError):
            entropy.decode_symbols([bytes(bad)], [1000], torch.device("cpu"), "test")
    low = entropy.zstd_compress(np.array([255, 3], np.uint8), 3)
    with pytest.raises(CodecError, match="escape"):   # a 255 byte no escape accounts for
        entropy.decode_symbols([struct.pack("<II", 0, len(low)) + low], [2],
                               torch.device("cpu"), "test")
    with pytest.raises(CodecError):  # a declared size beyond the limit is refused
        entropy.decode_symbols([stream], None, torch.device("cpu"), "test", limits=[10])


def test_container_checks_every_field():
    blob = entropy.pack_container(7, 3, 5, [b"abc", b"de"])
    assert entropy.unpack_container(blob, 7, 3, 5, 2, "t") == [b"abc", b"de"]
    from kdpipe.schemas import CodecMismatchError
    with pytest.raises(CodecMismatchError):
        entropy.unpack_container(blob, 8, 3, 5, 2, "t")
    for args in [(7, 4, 5, 2), (7, 3, 6, 2), (7, 3, 5, 1)]:
        with pytest.raises(CodecError):
            entropy.unpack_container(blob, *args, "t")
    for broken in [blob[:-1], blob + b"x", b"XXXX" + blob[4:],
                   blob[:-1] + bytes([blob[-1] ^ 1])]:
        with pytest.raises(CodecError):
            entropy.unpack_container(broken, 7, 3, 5, 2, "t")
