"""Decoding on a CUDA device gives what the CPU gives (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from kdpipe.compress import Codec, load_codec_config
from kdpipe.compress.codec import _rank_sort_torch, rank_sort, rank_sort_ordinals
from kdpipe.schemas import CodecConfig

from test_codec_facade import topk_rows

pytestmark = pytest.mark.gpu

POLY = CodecConfig.from_dict({"name": "poly", "top_k": 128, "ids": "packed", "hidden": "fp8",
                              "values": {"kind": "poly", "exact_k": 16,
                                         "exact_dtype": "bfloat16",
                                         "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
                                         "term_dtype": "float32",
                                         "residual_bins": [{"scale_dtype": "float16",
                                                            "element_bits": 3,
                                                            "num_elements": 64}]}})


@pytest.mark.parametrize("config", ["default", "small", "distillkit-recommended", POLY],
                         ids=lambda c: c if isinstance(c, str) else c.name)
def test_cuda_decode_matches_cpu(config):
    config = load_codec_config(config) if isinstance(config, str) else config
    codec = Codec(config, vocab_size=5000, top_k=128, hidden_size=64, hidden_dtype="float32")
    docs = [topk_rows(n, 128, seed=n) for n in (300, 1, 77)]
    blobs = [codec.encode_rows(i, v) for i, v in docs]
    args = ([b[0] for b in blobs], [b[1] for b in blobs], [300, 1, 77])
    cpu = codec.decode_rows_with_tail(*args, "cpu")
    gpu = codec.decode_rows_with_tail(*args, "cuda")
    for a, b in zip(cpu, gpu):
        if config.values.kind == "distillkit":   # DistillKit's float32 arithmetic
            torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)
        else:                                    # float64 basis / table: the same bits
            assert torch.equal(b.cpu(), a)
    x = torch.randn(50, 64) * 3
    hidden = codec.decode_hidden([codec.encode_hidden(x)], [50], "cuda")
    assert torch.equal(hidden.cpu(), codec.decode_hidden([codec.encode_hidden(x)], [50]))


def test_rank_sort_on_cuda_matches_the_cpu_path():
    ids, lps = topk_rows(500, 128, seed=1)
    ids, lps = torch.from_numpy(ids), torch.round(torch.from_numpy(lps), decimals=1)
    cpu = rank_sort(ids, lps)
    gpu = _rank_sort_torch(ids.cuda(), lps.cuda())
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("vocab", [5000, 1 << 24])   # int32 keys; int64 keys
def test_rank_sort_of_ordinals_on_cuda_matches_the_cpu_path(vocab):
    g = torch.Generator().manual_seed(2)
    levels = -torch.cumsum(torch.rand(600, generator=g) + 1e-3, 0)
    ids = torch.randint(0, vocab, (400, 128), generator=g, dtype=torch.int32)
    ordinals = torch.randint(0, 600, (400, 128), generator=g, dtype=torch.int32)
    cpu = rank_sort_ordinals(ids, ordinals, levels, vocab)
    gpu = rank_sort_ordinals(ids.cuda(), ordinals.cuda(), levels, vocab)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
