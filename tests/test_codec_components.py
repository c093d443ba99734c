"""Each codec kind on random data: round trips, stated error bounds, references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdpipe.compress.codecs import HIDDEN, IDS, VALUES, entropy, naive
from kdpipe.compress.codecs.base import sort_rows
from kdpipe.compress.codecs.grid import GridValues
from kdpipe.compress.codecs.hidden import fit_lowrank
from kdpipe.compress.codecs.ids import GapIds, PackedIds
from kdpipe.compress.codecs.poly import DistillKitValues, PolyValues
from kdpipe.schemas import CodecError, ConfigError

CPU = torch.device("cpu")
VOCAB = 5000


def topk_rows(n: int, k: int, seed: int, vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """Rank-ordered top-k (ids, log-probs) of random heavy-tailed distributions."""
    g = torch.Generator().manual_seed(seed)
    temp = torch.rand(n, 1, generator=g) * 3 + 0.3
    logits = torch.randn(n, vocab, generator=g) * temp * 2
    lp = torch.log_softmax(logits, dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    return ids.numpy().astype(np.int64), vals.numpy()


def split_docs(n: int, sizes: list[int]) -> list[slice]:
    bounds = np.cumsum([0] + sizes)
    assert bounds[-1] == n
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def round_trip_values(codec, values: np.ndarray, sizes: list[int]) -> torch.Tensor:
    blobs = [codec.encode(values[s]) for s in split_docs(len(values), sizes)]
    return codec.decode(blobs, sizes, CPU)


# -- ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"dictionary": False}, {"level": 1}])
def test_gap_ids_round_trip_in_their_storage_order(params):
    ids, _ = topk_rows(300, 64, seed=1)
    codec = GapIds(params, vocab_size=VOCAB, k=64)
    sizes = [1, 120, 0, 179]
    blobs, perms = [], []
    for s in split_docs(len(ids), sizes):
        blob, perm = codec.encode_ordered(ids[s])
        blobs.append(blob)
        perms.append(perm)
    out = codec.decode(blobs, sizes, CPU).numpy()
    np.testing.assert_array_equal(out, np.take_along_axis(ids, np.concatenate(perms), 1))
    np.testing.assert_array_equal(np.sort(out, 1), np.sort(ids, 1))


def test_gap_ids_dictionary_order_matches_reference():
    ids, _ = topk_rows(50, 16, seed=2, vocab=200)
    codec = GapIds({}, vocab_size=200, k=16)
    out = codec.decode([codec.encode_ordered(ids)[0]], [50], CPU).numpy()
    ranks = naive.dictionary_ranks(ids)
    expected = np.array([sorted(row, key=ranks.__getitem__) for row in ids.tolist()])
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), k=st.integers(1, 200), bound=st.sampled_from([2, 300, 1 << 24, 1 << 40]),
       seed=st.integers(0, 2**32 - 1))
def test_sort_rows_is_a_stable_row_sort(rows, k, bound, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, bound, (rows, k))
    ordered, perm = sort_rows(x, bound)
    np.testing.assert_array_equal(perm, np.argsort(x, axis=1, kind="stable"))
    np.testing.assert_array_equal(ordered, np.sort(x, axis=1))
    carry = rng.integers(0, 1000, (rows, k))   # carried entries follow their keys
    ordered, carried = sort_rows(x, bound, carry, 1000)
    order = np.lexsort((carry, x), axis=1)
    np.testing.assert_array_equal(ordered, np.take_along_axis(x, order, 1))
    np.testing.assert_array_equal(carried, np.take_along_axis(carry, order, 1))
    with pytest.raises(ValueError, match="carried"):   # would spill into the keys
        sort_rows(x, bound, carry, int(carry.max()))


@pytest.mark.parametrize("gaps", [[0, 0, 1], [0, 0, 50], [2**31 - 1] * 3])
def test_gap_ids_refuse_ranks_past_the_dictionary(gaps):
    """A well-formed blob (valid checksum) whose rows index past its 3-entry dictionary."""
    codec = GapIds({}, vocab_size=100, k=3)
    good = codec.encode_ordered(np.array([[5, 7, 9]]))[0]
    dictionary, classes, _ = entropy.unpack_container(good, codec.tag, 1, 3, 3, "test")
    bad = entropy.pack_container(codec.tag, 1, 3, [
        dictionary, classes, entropy.encode_symbols(np.array(gaps), 1)])
    with pytest.raises(CodecError, match="dictionary"):
        codec.decode([bad], [1], CPU)


def test_gap_ids_refuse_duplicates_and_out_of_range():
    codec = GapIds({"dictionary": False}, vocab_size=100, k=3)
    with pytest.raises(CodecError, match="ascending"):
        codec.encode(np.array([[1, 1, 2]]))
    small = GapIds({"dictionary": False}, vocab_size=50, k=3)
    with pytest.raises(CodecError, match="outside the vocabulary"):
        small.decode([codec.encode(np.array([[1, 2, 90]]))], [1], CPU)


@pytest.mark.parametrize("bits", [None, 13, 17, 32])
def test_packed_ids_round_trip(bits):
    ids, _ = topk_rows(40, 50, seed=3)
    codec = PackedIds({} if bits is None else {"bits": bits}, vocab_size=VOCAB, k=50)
    blob = codec.encode(ids)
    assert len(blob) == 40 * math.ceil(50 * (bits or 13) / 8)
    np.testing.assert_array_equal(codec.decode([blob], [40], CPU).numpy(), ids)


def test_packed_ids_refuse_a_vocabulary_wider_than_their_bits():
    with pytest.raises(ConfigError, match="vocabulary"):
        PackedIds({"bits": 12}, vocab_size=VOCAB, k=8)
    codec = PackedIds({}, vocab_size=VOCAB, k=2)   # 13 bits hold ids up to 8191
    with pytest.raises(CodecError, match="outside the vocabulary"):
        codec.decode([codec.encode(np.array([[8000, 1]]))], [1], CPU)


# -- grid values ------------------------------------------------------------------------------

@pytest.mark.parametrize("transform,step", [("sqrt", 0.002), ("sqrt", 0.01), ("log", 0.05),
                                            ("log", 0.2)])
@pytest.mark.parametrize("delta", [False, True])
def test_grid_meets_its_error_bound(transform, step, delta):
    ids, lps = topk_rows(200, 128, seed=4)
    codec = GridValues({"transform": transform, "step": step, "delta": delta}, k=128)
    sizes = [77, 123]
    blobs = [codec.encode(lps[s]) for s in split_docs(200, sizes)]
    values, tail = codec.decode_with_tail(blobs, sizes, CPU)
    values, tail = values.double().numpy(), tail.double().numpy()
    assert np.isfinite(values).all()
    mass = 1 - np.exp(lps.astype(np.float64)).sum(1)
    if transform == "sqrt":  # bins decode to their mean: within 0.55 step in sqrt(p)
        assert np.abs(np.exp(values / 2) - np.exp(lps / 2)).max() <= 0.55 * step + 1e-6
        assert np.abs(np.sqrt(tail) - np.sqrt(mass)).max() <= 0.55 * step + 1e-6
    else:
        assert np.abs(values - lps).max() <= step / 2 + 1e-5
        assert np.abs(np.log(tail) - np.log(mass)).max() <= step / 2 + 1e-5
    np.testing.assert_array_equal(codec.decode(blobs, sizes, CPU).double().numpy(), values)


def test_grid_matches_the_per_element_reference():
    _, lps = topk_rows(20, 32, seed=5)
    for transform, step in [("sqrt", 0.003), ("log", 0.07)]:
        codec = GridValues({"transform": transform, "step": step}, k=32)
        out = codec.decode([codec.encode(lps)], [20], CPU).numpy()
        ref = [[naive.grid_logprob(naive.grid_quantize(v, transform, step), transform, step)
                for v in row] for row in lps.tolist()]
        np.testing.assert_allclose(out, np.array(ref), rtol=1e-6, atol=1e-6)


def test_grid_expected_kl_is_k_step_squared_over_six_mass():
    _, lps = topk_rows(400, 128, seed=6)
    step = 0.002
    codec = GridValues({"transform": "sqrt", "step": step}, k=128)
    q = codec.decode([codec.encode(lps)], [400], CPU).double().numpy()
    p = np.exp(lps.astype(np.float64))
    mass = p.sum(1)
    p /= mass[:, None]
    qn = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(qn))).sum(1)
    predicted = 128 * step ** 2 / (6 * mass)
    assert 0.7 < kl.mean() / predicted.mean() < 1.3


def test_grid_refuses_nan_and_bad_params():
    codec = GridValues({"transform": "sqrt", "step": 0.01}, k=2)
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(np.array([[0.0, np.nan]], np.float32))
    for params in [{"transform": "cube", "step": 0.1}, {"transform": "log"},
                   {"transform": "log", "step": 0.1, "bogus": 1}]:
        with pytest.raises(ConfigError):
            GridValues(params, k=2)


# -- poly / distillkit values -----------------------------------------------------------------

def test_poly_with_all_values_exact_is_lossless():
    _, lps = topk_rows(30, 40, seed=7)
    for cls in (PolyValues, DistillKitValues):
        codec = cls({"exact_k": 40, "exact_dtype": "float32", "delta_encoding": False}, k=40)
        np.testing.assert_array_equal(codec.decode([codec.encode(lps)], [30], CPU).numpy(), lps)


@pytest.mark.parametrize("delta", [False, True])
def test_poly_fit_is_the_least_squares_fit(delta):
    _, lps = topk_rows(50, 64, seed=8)
    terms = [0, 1, 2, 3, "sqrt"]
    codec = PolyValues({"exact_k": 8, "exact_dtype": "float64", "polynomial_terms": terms,
                        "term_dtype": "float64", "delta_encoding": delta}, k=64)
    out = codec.decode([codec.encode(lps)], [50], CPU).double().numpy()
    np.testing.assert_allclose(out[:, :8], lps[:, :8], atol=1e-6)
    t = np.linspace(0, 1, 56)
    basis = np.stack([np.sqrt(t) if x == "sqrt" else (2 * t - 1) ** x for x in terms], 1)
    # with delta encoding the fitted differences are summed: the tail lies in the span of
    # the cumulated basis, offset by the last head value
    design = np.cumsum(basis, axis=0) if delta else basis
    offset = out[:, 7:8] if delta else 0.0
    target = lps[:, 8:].astype(np.float64) - offset
    best = (design @ np.linalg.lstsq(design, target.T, rcond=None)[0]).T + offset
    np.testing.assert_allclose(out[:, 8:], best, atol=2e-6)


def _binned(bits: int, delta: bool, bins: bool = True) -> PolyValues:
    spec = [{"scale_dtype": "float32", "element_bits": bits, "num_elements": 20},
            {"scale_dtype": "float16", "element_bits": min(bits + 1, 32), "num_elements": 10}]
    return PolyValues({"exact_k": 4, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1],
                       "term_dtype": "bfloat16", "residual_bins": spec if bins else [],
                       "delta_encoding": delta}, k=64)


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 13, 32])
def test_poly_residual_bins_meet_their_bound(bits):
    _, lps = topk_rows(60, 64, seed=9)
    codec = _binned(bits, delta=False)
    blob = codec.encode(lps)
    assert len(blob) == 60 * codec.layout.row_bytes
    err = np.abs(codec.decode([blob], [60], CPU).double().numpy() - lps)
    assert (err[:, :4] <= np.abs(lps[:, :4]) * 2 ** -8 + 1e-6).all()   # bf16 head
    fit_only = _binned(bits, delta=False, bins=False)
    resid = np.abs(fit_only.decode([fit_only.encode(lps)], [60], CPU).double().numpy() - lps)
    if bits > 1:  # half a level; the largest residual maps onto the largest level
        bound = resid[:, 4:24].max(1, keepdims=True) / ((1 << (bits - 1)) - 1) * 0.5
        assert (err[:, 4:24] <= bound * 1.01 + 1e-5).all()
    else:         # sign only: never worse than the fit by more than the mean |residual|
        assert err[:, 4:24].mean() < resid[:, 4:24].mean()
    np.testing.assert_array_equal(err[:, 34:], resid[:, 34:])  # beyond the bins: the fit


@pytest.mark.parametrize("bits", [4, 8])
def test_poly_delta_bins_run_closed_loop(bits):
    """With delta encoding every stored difference is taken against the decoder's running
    value, so quantization errors do not add up along the row."""
    _, lps = topk_rows(60, 64, seed=9)
    codec, fit_only = _binned(bits, delta=True), _binned(bits, delta=True, bins=False)
    err = np.abs(codec.decode([codec.encode(lps)], [60], CPU).double().numpy() - lps)
    resid = np.abs(fit_only.decode([fit_only.encode(lps)], [60], CPU).double().numpy() - lps)
    assert err[:, 4:34].mean() < resid[:, 4:34].mean() / 2 ** (bits - 3)
    assert err[:, 4:34].max() < resid[:, 4:34].max()


def test_poly_decodes_a_single_row():
    _, lps = topk_rows(1, 50, seed=12)   # one row: every field slice is already contiguous
    codec = DistillKitValues({"exact_k": 1, "exact_dtype": "bfloat16",
                              "polynomial_terms": [0, 1, "sqrt"], "delta_encoding": False}, k=50)
    out = codec.decode([codec.encode(lps)], [1], CPU)
    assert out.shape == (1, 50) and torch.isfinite(out).all()


def test_poly_matches_the_per_row_reference():
    _, lps = topk_rows(5, 24, seed=10)
    params = {"exact_k": 3, "exact_dtype": "float16", "polynomial_terms": [0, 1, 2, "exp"],
              "term_dtype": "float32",
              "residual_bins": [{"scale_dtype": "float32", "element_bits": 5, "num_elements": 9},
                                {"scale_dtype": "float64", "element_bits": 1,
                                 "num_elements": 4}]}
    for delta in (False, True):
        codec = PolyValues({**params, "delta_encoding": delta}, k=24)
        blob = codec.encode(lps)
        out = codec.decode([blob], [5], CPU).numpy()
        size = codec.layout.row_bytes
        for i in range(5):
            ref = naive.poly_decode_row(blob[i * size:(i + 1) * size], k=24, exact_k=3,
                                        exact_fmt="e", terms=[0, 1, 2, "exp"], term_fmt="f",
                                        bins=[("f", 5, 9), ("d", 1, 4)], delta=delta)
            np.testing.assert_allclose(out[i], ref, rtol=1e-6, atol=1e-6)


def test_poly_config_errors():
    for params in [{"exact_k": 4}, {"exact_k": 99, "polynomial_terms": [0]},
                   {"exact_k": 2, "polynomial_terms": [0, 0]},
                   {"exact_k": 2, "polynomial_terms": ["cube"]},
                   {"exact_k": 2, "residual_bins": [{"scale_dtype": "float32",
                                                     "element_bits": 40, "num_elements": 4}]},
                   {"exact_k": 2, "residual_bins": [{"scale_dtype": "float32",
                                                     "element_bits": 4, "num_elements": 9}]},
                   {"exact_k": 2, "exact_dtype": "int8", "polynomial_terms": [0]}]:
        with pytest.raises(ConfigError):
            PolyValues(params, k=8)
    codec = DistillKitValues({"exact_k": 2, "polynomial_terms": [0], "error_diffusion": True},
                             k=8)
    with pytest.raises(ConfigError, match="error_diffusion"):
        codec.encode(np.zeros((1, 8), np.float32))


def test_poly_refuses_wrong_lengths_and_nan_rows():
    codec = PolyValues({"exact_k": 2, "exact_dtype": "float32", "polynomial_terms": [0, 1]},
                       k=8)
    blob = codec.encode(topk_rows(3, 8, seed=11)[1])
    with pytest.raises(CodecError, match="expected"):
        codec.decode([blob[:-1]], [3], CPU)
    nan_row = bytearray(blob)
    nan_row[0:4] = np.array([np.nan], np.float32).tobytes()
    with pytest.raises(CodecError, match="NaN"):
        codec.decode([bytes(nan_row)], [3], CPU)


# -- hidden -----------------------------------------------------------------------------------

def hidden_states(t: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    x[:, 3] *= 80      # a "massive activation" dimension
    return x


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def test_scaled_hidden_codecs_meet_their_bounds():
    x = hidden_states(64, 96, seed=12)
    sizes = [30, 34]
    for kind, row_bytes in [("bf16", 192), ("fp8", 98), ("int8", 98)]:
        codec = HIDDEN[kind]({}, hidden_size=96, dtype=torch.float32)
        blobs = [codec.encode(x[:30]), codec.encode(x[30:])]
        assert sum(map(len, blobs)) == 64 * row_bytes
        out = codec.decode(blobs, sizes, CPU)
        if kind == "bf16":
            assert torch.equal(out, x.to(torch.bfloat16).float())
        elif kind == "fp8":   # 3 mantissa bits: relative error <= 2^-4 above the subnormals
            scale = x.abs().amax(1, keepdim=True) / 448
            assert ((out - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -9 * 1.01).all()
            assert cosine(out, x).min() > 0.999
        else:                 # uniform levels: half a step of max|x| / 127
            scale = x.abs().amax(1, keepdim=True) / 127
            assert ((out - x).abs() <= scale * 0.5 * 1.01).all()


def test_lowrank_reconstructs_data_of_its_rank():
    g = torch.Generator().manual_seed(13)
    basis = torch.linalg.qr(torch.randn(64, 8, generator=g)).Q
    x = torch.randn(200, 8, generator=g) @ basis.T * 5 + torch.randn(64, generator=g)
    artifact = fit_lowrank({3: x}, rank=8)
    import hashlib
    params = {"rank": 8, "coeff_dtype": "bfloat16", "projection": "artifacts/p.safetensors",
              "projection_sha256": hashlib.sha256(artifact).hexdigest()}
    codec = HIDDEN["lowrank"](params, hidden_size=64, dtype=torch.float32,
                              artifacts={"artifacts/p.safetensors": artifact}.__getitem__)
    blob = codec.encode(x, layer=3)
    assert len(blob) == 200 * 16
    out = codec.decode([blob], [200], CPU, layer=3)
    assert cosine(out, x).min() > 0.9999
    with pytest.raises(CodecError, match="layer 4"):
        codec.decode([blob], [200], CPU, layer=4)
    tampered = HIDDEN["lowrank"]({**params, "projection_sha256": "0" * 64}, hidden_size=64,
                                 dtype=torch.float32,
                                 artifacts={"artifacts/p.safetensors": artifact}.__getitem__)
    with pytest.raises(CodecError, match="sha256"):
        tampered.decode([blob], [200], CPU, layer=3)
    orphan = HIDDEN["lowrank"](params, hidden_size=64, dtype=torch.float32)
    with pytest.raises(ConfigError, match="artifact"):
        orphan.decode([blob], [200], CPU, layer=3)


@pytest.mark.parametrize("kind", ["native", "bf16", "fp8", "int8"])
def test_hidden_arrays_are_the_encoded_bytes_and_own_their_memory(kind):
    x = hidden_states(20, 32, seed=15)
    codec = HIDDEN[kind]({}, hidden_size=32, dtype=torch.float32)
    out = codec.encode_array(x)
    assert out.dtype == np.uint8 and out.ndim == 1 and out.tobytes() == codec.encode(x)
    before = out.copy()
    x.mul_(2)   # a caller reusing its tensor does not change what was encoded
    np.testing.assert_array_equal(out, before)


def test_every_registered_kind_is_covered():
    assert set(IDS) == {"int32", "packed", "gaps", "sampled"}
    assert set(VALUES) == {"float32", "grid", "poly", "distillkit", "counts"}
    assert set(HIDDEN) == {"native", "bf16", "fp8", "int8", "lowrank"}
