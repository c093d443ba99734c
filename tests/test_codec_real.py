"""Codecs on the embedded teacher's real distributions and hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.compress import Codec, load_codec_config
from kdpipe.compress.codecs import HIDDEN

from helpers import docstring_texts

K = 128


@pytest.fixture(scope="module")
def real(teacher_dir):
    """Exact top-128 rows and two hidden layers of the teacher on three short documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.capture.topk import topk_logprobs

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    docs = []
    for text in docstring_texts(3, max_chars=1500):
        ids = torch.tensor([tok(text)["input_ids"][:320]])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        top_ids, top_lps = topk_logprobs(out.logits[0], K)
        docs.append((top_ids.numpy(), top_lps.numpy(),
                     {layer: out.hidden_states[layer][0] for layer in (10, 20)}))
    return docs, model.config.vocab_size, model.config.hidden_size


def _kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    p = p_log - np.logaddexp.reduce(p_log, axis=1, keepdims=True)
    q = q_log - np.logaddexp.reduce(q_log, axis=1, keepdims=True)
    return (np.exp(p) * (p - q)).sum(1)


def _round_trip(real, preset: str):
    docs, vocab, hidden = real
    codec = Codec(load_codec_config(preset), vocab_size=vocab, top_k=K, hidden_size=hidden,
                  hidden_dtype="float32")
    blobs = [codec.encode_rows(ids, lps) for ids, lps, _ in docs]
    rows = [ids.shape[0] for ids, _, _ in docs]
    ids, lps, tail = codec.decode_rows_with_tail([b[0] for b in blobs], [b[1] for b in blobs],
                                                 rows)
    ref_ids = np.concatenate([d[0] for d in docs])[:, :codec.k]
    ref = np.concatenate([d[1] for d in docs])[:, :codec.k].astype(np.float64)
    # align the decoded values with the reference by id
    order, ref_order = np.argsort(ids.numpy(), 1), np.argsort(ref_ids, 1)
    assert np.array_equal(np.take_along_axis(ids.numpy(), order, 1),
                          np.take_along_axis(ref_ids, ref_order, 1))
    dec = np.empty_like(ref)
    np.put_along_axis(dec, ref_order, np.take_along_axis(lps.double().numpy(), order, 1), 1)
    nbytes = sum(len(a) + len(b) for a, b in blobs) / sum(rows)
    return codec, ref, dec, tail.double().numpy(), nbytes


def test_exact_is_lossless_on_real_rows(real):
    _, ref, dec, tail, nbytes = _round_trip(real, "exact")
    np.testing.assert_array_equal(dec, ref)
    assert nbytes == 8 * K


@pytest.mark.parametrize("preset,kl_bound", [("default", 1e-4), ("small", 1.5e-4)])
def test_grid_presets_meet_their_bounds_on_real_rows(real, preset, kl_bound):
    codec, ref, dec, tail, nbytes = _round_trip(real, preset)
    step = codec.values.step
    assert np.abs(np.exp(dec / 2) - np.exp(ref / 2)).max() <= 0.55 * step + 1e-6
    mass = np.clip(1 - np.exp(ref).sum(1), 0, 1)
    assert np.abs(np.sqrt(tail) - np.sqrt(mass)).max() <= 0.55 * step + 1e-6
    assert _kl(ref, dec).mean() <= kl_bound
    # three short documents amortize the per-document dictionary less than a capture does
    assert nbytes <= {"default": 205, "small": 92}[preset]


@pytest.mark.parametrize("preset,kl_bound", [("distillkit-recommended", 1e-3),
                                             ("distillkit-budget", 0.1)])
def test_distillkit_presets_with_a_float64_fit(real, preset, kl_bound):
    codec, ref, dec, _, nbytes = _round_trip(real, preset)
    assert nbytes == {"distillkit-recommended": 312, "distillkit-budget": 114}[preset]
    exact_k = codec.values.layout.exact_k   # bf16 head
    assert (np.abs(dec[:, :exact_k] - ref[:, :exact_k]) <= np.abs(ref[:, :exact_k]) * 2 ** -8
            + 1e-6).all()
    assert _kl(ref, dec).mean() <= kl_bound
    assert np.abs(dec - ref).mean() < 0.2   # DistillKit's own float32 fit: ~1.4-2.6 nats


def test_hidden_codecs_on_real_states(real):
    docs, _, hidden = real
    for layer in (10, 20):
        x = torch.cat([d[2][layer] for d in docs])
        for kind, min_cos in [("bf16", 0.99999), ("fp8", 0.999), ("int8", 0.995)]:
            codec = HIDDEN[kind]({}, hidden_size=hidden, dtype=torch.float32)
            out = codec.decode([codec.encode(x)], [x.shape[0]], torch.device("cpu"))
            cos = torch.nn.functional.cosine_similarity(out.double(), x.double(), dim=1)
            assert cos.mean() >= min_cos, (kind, layer, float(cos.mean()))
