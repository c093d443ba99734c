"""Fuzzing the decoders: arbitrary bytes never crash, hang or yield out-of-range ids.

Every outcome must be either a decoded batch of the right shape with ids inside the
vocabulary, or one of kdpipe's own errors (``KdpipeError``), which the CLI reports cleanly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdpipe.compress import Codec, load_codec_config
from kdpipe.schemas import KdpipeError

VOCAB, K, H = 2000, 128, 8
PRESETS = ["exact", "default", "small", "distillkit-recommended", "distillkit-budget"]


def _codec(name: str) -> Codec:
    return Codec(load_codec_config(name), vocab_size=VOCAB, top_k=K, hidden_size=H,
                 hidden_dtype="float32")


@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.binary(max_size=4000), values=st.binary(max_size=4000),
       rows=st.integers(min_value=0, max_value=12))
def test_random_topk_bytes(preset, ids, values, rows):
    codec = _codec(preset)
    try:
        got_ids, got_lps = codec.decode_rows([ids], [values], [rows])
    except KdpipeError:
        return
    assert got_ids.shape == got_lps.shape == (rows, codec.k)
    if got_ids.numel():
        assert int(got_ids.min()) >= 0 and int(got_ids.max()) < VOCAB


@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rows=st.integers(min_value=1, max_value=6))
def test_mutated_valid_blobs(preset, data, rows):
    """Valid encodings with a few bytes changed, cut or appended."""
    codec = _codec(preset)
    g = torch.Generator().manual_seed(rows)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(rows)])
    lps = torch.sort(torch.randn(rows, K, generator=g).abs().neg() * 3, dim=1,
                     descending=True).values
    blob_ids, blob_vals = codec.encode_rows(ids.numpy(), lps.numpy())
    which = data.draw(st.sampled_from(["ids", "values"]))
    blob = bytearray(blob_ids if which == "ids" else blob_vals)
    op = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if op == "flip" and blob:
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        blob = blob[: data.draw(st.integers(0, max(len(blob) - 1, 0)))]
    else:
        blob += data.draw(st.binary(min_size=1, max_size=16))
    args = ([bytes(blob)], [blob_vals]) if which == "ids" else ([blob_ids], [bytes(blob)])
    try:
        got_ids, _ = codec.decode_rows(*args, [rows])
    except KdpipeError:
        return
    assert got_ids.shape == (rows, codec.k)
    assert int(got_ids.min()) >= 0 and int(got_ids.max()) < VOCAB
