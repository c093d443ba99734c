"""Every registered codec kind declares its capabilities, and does what it declares: a
lossless kind round-trips exactly (and a lossy one does not), a rank-order ids kind keeps the
rows' order (and another permutes them), an entropy-coded kind's sizes follow the content (a
fixed-width one's do not), a kind storing the missing mass decodes a tail other than the one
its values imply, and a kind with side data refuses to run without it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from kdpipe.compress import load_codec_config, needs_fitting
from kdpipe.compress.codecs import HIDDEN, IDS, VALUES
from kdpipe.compress.codecs.base import tail_from_values
from kdpipe.compress.codecs.hidden import fit_lowrank
from kdpipe.schemas import ConfigError
from test_codec_components import hidden_states, topk_rows

CPU = torch.device("cpu")
VOCAB, K, ROWS, H = 5000, 16, 64, 32
POLY = {"exact_k": 4, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2],
        "term_dtype": "float32"}
IDS_CASES = [("int32", {}), ("packed", {}), ("gaps", {}), ("gaps", {"dictionary": False}),
             ("sampled", {"draws": K})]
VALUES_CASES = [("float32", {}), ("grid", {"transform": "sqrt", "step": 0.01}),
                ("grid", {"transform": "sqrt", "step": 0.01, "tail_mass": False}),
                ("grid", {"transform": "log", "step": 0.05}), ("poly", POLY),
                ("distillkit", POLY)]
SAMPLED_VALUES = {"counts"}   # the sampled signal's counts: tests/test_sampled.py
HIDDEN_CASES = [("native", {}), ("bf16", {}), ("fp8", {}), ("int8", {}),
                ("lowrank", {"rank": 4, "projection": "artifacts/p.safetensors"})]


def test_every_registered_kind_is_covered():
    for table, cases in ((IDS, IDS_CASES), (VALUES, VALUES_CASES), (HIDDEN, HIDDEN_CASES)):
        assert {kind for kind, _ in cases} == set(table) - SAMPLED_VALUES


@pytest.mark.parametrize("kind,params", IDS_CASES)
def test_ids_capabilities(kind, params):
    codec = IDS[kind](params, vocab_size=VOCAB, k=K)
    caps = codec.capabilities
    ids, _ = topk_rows(ROWS, K, seed=1, vocab=VOCAB)
    blob, perm = codec.encode_ordered(ids)
    assert (perm is None) == caps.rank_order
    stored = ids if perm is None else np.take_along_axis(ids, perm, 1)
    assert caps.rank_order == (perm is None or np.array_equal(stored, ids))
    out = codec.decode([blob], [ROWS], CPU).numpy()
    assert np.array_equal(out, stored) == caps.lossless
    repeated = np.tile(np.arange(K), (ROWS, 1))
    assert (len(codec.encode_ordered(repeated)[0]) != len(blob)) == caps.entropy_coded
    assert caps.side_data is None and not caps.stores_missing_mass


@pytest.mark.parametrize("kind,params", VALUES_CASES)
def test_values_capabilities(kind, params):
    codec = VALUES[kind](params, k=K)
    caps = codec.capabilities
    _, lps = topk_rows(ROWS, K, seed=2, vocab=VOCAB)
    blob = codec.encode(lps)
    values, tail = codec.decode_with_tail([blob], [ROWS], CPU)
    assert np.array_equal(values.numpy(), lps) == caps.lossless
    assert (not torch.equal(tail, tail_from_values(values))) == caps.stores_missing_mass
    flat = np.full_like(lps, -np.log(2 * K))
    assert (len(codec.encode(flat)) != len(blob)) == caps.entropy_coded
    assert caps.rank_order and caps.side_data is None


@pytest.mark.parametrize("kind,params", HIDDEN_CASES)
def test_hidden_capabilities(kind, params):
    x = hidden_states(ROWS, H, seed=3)
    requested = []
    artifact = fit_lowrank({0: x}, rank=4)

    def load(rel: str) -> bytes:
        requested.append(rel)
        return artifact

    caps = HIDDEN[kind].capabilities
    if caps.side_data is not None:
        params = {**params, "projection_sha256": hashlib.sha256(artifact).hexdigest()}
        without = {k: v for k, v in params.items() if k != caps.side_data}
        with pytest.raises(ConfigError, match=caps.side_data):
            HIDDEN[kind](without, hidden_size=H, dtype=torch.float32, artifacts=load)
    codec = HIDDEN[kind](params, hidden_size=H, dtype=torch.float32, artifacts=load)
    assert codec.capabilities == caps
    blob = codec.encode(x, layer=0)
    out = codec.decode([blob], [ROWS], CPU, layer=0)
    assert torch.equal(out, x) == caps.lossless
    assert requested == ([params[caps.side_data]] if caps.side_data else [])
    assert (len(codec.encode(torch.zeros_like(x), layer=0)) != len(blob)) == caps.entropy_coded
    assert caps.rank_order and not caps.stores_missing_mass


def test_the_facade_reads_side_data_from_the_declaration(tmp_path):
    f = tmp_path / "lr.yaml"
    f.write_text("ids: int32\nvalues: float32\nhidden: {kind: lowrank, rank: 4}\n")
    assert needs_fitting(load_codec_config(str(f)))
    f.write_text("ids: int32\nvalues: float32\nhidden: {kind: lowrank, rank: 4, "
                 "projection: artifacts/p.safetensors, projection_sha256: '0'}\n")
    assert not needs_fitting(load_codec_config(str(f)))
    assert not any(needs_fitting(load_codec_config(n)) for n in ("exact", "default", "small"))
