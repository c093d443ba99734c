"""One read of a ``[N, V]`` logits matrix on the GPU: float32 log-normalizer and group maxima.

This is the only pass over the vocabulary that capture makes besides the LM head's own matmul:
no float32 copy of the logits and no ``log_softmax`` output is written. One program per row
walks the vocabulary in blocks of ``GROUPS_PER_BLOCK`` groups, keeping an online log-sum-exp.
The group count is a compile-time constant: one compilation per vocabulary size.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

GROUPS_PER_BLOCK = 32


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def logsum_group_max(x_ptr, logsum_ptr, gmax_ptr, vocab, stride_row,
                         N_GROUPS: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_row
        g_row = gmax_ptr + row * N_GROUPS
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, N_GROUPS, GPB):
            gidx = start + tl.arange(0, GPB)
            offs = gidx[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            x = tl.load(x_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            gm = tl.max(x, axis=1)
            tl.store(g_row + gidx, gm, mask=gidx < N_GROUPS)
            m_new = tl.maximum(m, tl.max(gm, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.sum(tl.exp(x - m_new), axis=1), axis=0)
            m = m_new
        tl.store(logsum_ptr + row, tl.log(s))     # relative to the row maximum m

    return logsum_group_max


def logsum_and_group_max_cuda(logits: torch.Tensor,
                              group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``capture.topk.logsum_and_group_max``; ``logits`` is a CUDA tensor of any float dtype."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    n_groups = -(-vocab // group)
    logsum = torch.empty(n, dtype=torch.float32, device=logits.device)
    gmax = torch.empty(n, n_groups, dtype=torch.float32, device=logits.device)
    if n:
        _kernel()[(n,)](logits, logsum, gmax, vocab, logits.stride(0), N_GROUPS=n_groups,
                        GROUP=group, GPB=GROUPS_PER_BLOCK, num_warps=8)
    return logsum, gmax
