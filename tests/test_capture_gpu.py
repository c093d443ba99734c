"""The capture's one-pass top-k on CUDA (Triton kernel) against the CPU path and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.topk import logsum_and_group_max, topk_logprobs
from compress.codecs.hidden import FP8_MAX, _scaled_encode

pytestmark = pytest.mark.gpu


def logits(n: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 2
    x[: n // 4] = torch.randint(0, 4, (n // 4, vocab), generator=g).float()   # massive ties
    x[n // 4: n // 3, -100:] = 7.0                                           # last group wins
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [128004, 49152, 1000])
def test_cuda_topk_equals_cpu_and_float64(vocab, dtype):
    x = logits(300, vocab, dtype)
    logsum_gpu, gmax_gpu = logsum_and_group_max(x.cuda())
    logsum_cpu, gmax_cpu = logsum_and_group_max(x)
    assert torch.equal(gmax_gpu.cpu(), gmax_cpu)
    torch.testing.assert_close(logsum_gpu.cpu(), logsum_cpu, atol=2e-6, rtol=1e-6)
    ids, lp = topk_logprobs(x.cuda(), 128)
    ref_ids, _ = topk_logprobs(x, 128)
    assert torch.equal(ids.cpu(), ref_ids)
    x64 = x.double()
    assert torch.equal(ref_ids, torch.sort(-x64, dim=-1, stable=True).indices[:, :128])
    torch.testing.assert_close(lp.cpu().double(), torch.log_softmax(x64, -1).gather(-1, ref_ids),
                               atol=4e-6, rtol=0)


def test_fp8_hidden_encoding_on_cuda_is_bitwise_the_cpu_encoding():
    x = (torch.randn(257, 2560) * torch.logspace(-2, 2, 2560)).to(torch.bfloat16)
    to_fp8 = lambda v: v.to(torch.float8_e4m3fn)   # noqa: E731
    assert np.array_equal(_scaled_encode(x.cuda(), FP8_MAX, to_fp8),
                          _scaled_encode(x, FP8_MAX, to_fp8))
