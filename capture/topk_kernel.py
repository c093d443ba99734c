"""The exact top-k of ``capture.topk`` on the GPU, in two Triton kernels of one program per row.

The first is the only pass over the vocabulary that capture makes besides the LM head's own
matmul: no float32 copy of the logits and no ``log_softmax`` output is written. It walks the
vocabulary in blocks of ``GROUPS_PER_BLOCK`` groups, keeping an online log-sum-exp, and writes
the log-normalizer and the group maxima.

The second does the rest in registers: it ranks the group maxima on their keys, loads the top
groups' logits in id order, ranks those on their keys and writes ids and log-probs. Torch takes
six kernels for it and materializes every candidate, key and index in between; here the only
memory traffic is the candidates' logits. Group and candidate counts are compile-time
constants: one compilation per vocabulary size, k and group size.

Importing this module imports Triton; ``capture.topk`` does so only when Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUPS_PER_BLOCK = 32
MAX_IN_REGISTERS = 1 << 14     # the most keys one program ranks (also keeps positions < 2**16)
SELECT_WARPS = 8               # warps of a selecting program: 32 keys a thread at 8,192
_KEYS = {False: (0xFFFF, -(1 << 31)),          # 16-bit logits: int32 keys, 16 bits of position
         True: (0xFFFFFFFF, -(1 << 63))}        # float32 logits: int64 keys, 32 bits of position


@triton.jit
def _logsum_group_max(x_ptr, logsum_ptr, gmax_ptr, vocab, stride_row,
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


@triton.jit
def _key(v, pos, WIDE: tl.constexpr):
    """(value, inverted position) as one integer: ``capture.topk``'s keys."""
    if WIDE:
        b = v.to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(b < 0, -(b & 0x7FFFFFFF), b) * 4294967296 + (4294967295 - pos.to(tl.int64))
    else:
        b = v.to(tl.int16, bitcast=True).to(tl.int32)
        return tl.where(b < 0, -(b & 0x7FFF), b) * 65536 + (65535 - pos)


@triton.jit
def _select_topk(x_ptr, gmax_ptr, logsum_ptr, gid_ptr, ids_ptr, lp_ptr, vocab, stride_row, k,
                 N_GROUPS: tl.constexpr, NG_POW2: tl.constexpr, GROUP: tl.constexpr,
                 K: tl.constexpr, WIDE: tl.constexpr, LOW: tl.constexpr, KEY_MIN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_row
    g = tl.arange(0, NG_POW2)
    gm = tl.load(gmax_ptr + row * N_GROUPS + g, mask=g < N_GROUPS, other=float("-inf"))
    row_max = tl.max(gm, axis=0)
    # group maxima are logits (or -inf): exact in the logits' own dtype
    gkey = tl.where(g < N_GROUPS, _key(gm.to(x_ptr.dtype.element_ty), g, WIDE), KEY_MIN)
    gid = tl.sort((LOW - (tl.topk(gkey, K) & LOW)).to(tl.int32))   # top groups, in id order
    tl.store(gid_ptr + row * K + tl.arange(0, K), gid)
    lane = tl.arange(0, GROUP)[None, :]
    ids = gid[:, None] * GROUP + lane
    real = ids < vocab                      # the last group may run past the vocabulary
    x = tl.load(x_row + ids, mask=real, other=float("-inf"))
    key = tl.where(real, _key(x, tl.arange(0, K)[:, None] * GROUP + lane, WIDE), KEY_MIN)
    pos = LOW - (tl.topk(tl.reshape(key, [K * GROUP]), K) & LOW)
    tl.debug_barrier()                      # the row's group ids, stored by other threads
    out = tl.load(gid_ptr + row * K + pos // GROUP).to(tl.int64) * GROUP + pos % GROUP
    lp = tl.load(x_row + out).to(tl.float32) - row_max - tl.load(logsum_ptr + row)
    o = tl.arange(0, K)
    tl.store(ids_ptr + row * k + o, out, mask=o < k)
    tl.store(lp_ptr + row * k + o, lp, mask=o < k)


def _pow2(n: int) -> int:
    """``n`` rounded up to a power of two of at least 2: what Triton's sorts take."""
    return max(2, 1 << (n - 1).bit_length())


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
        _logsum_group_max[(n,)](logits, logsum, gmax, vocab, logits.stride(0), N_GROUPS=n_groups,
                                GROUP=group, GPB=GROUPS_PER_BLOCK, num_warps=8)
    return logsum, gmax


def select_fits(k: int, n_groups: int, group: int) -> bool:
    """Whether ``select_topk_cuda`` takes this shape: more groups than k rounded up to a power
    of two, and at most ``MAX_IN_REGISTERS`` groups and candidates."""
    return _pow2(k) <= n_groups and max(_pow2(n_groups), _pow2(k) * group) <= MAX_IN_REGISTERS


def select_topk_cuda(logits: torch.Tensor, logsum: torch.Tensor, gmax: torch.Tensor, k: int,
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (int64 [N, k]) and log-probs (float32 [N, k]) of the top k from
    ``logsum_and_group_max_cuda``'s outputs; the shape must pass ``select_fits``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    n_groups = gmax.shape[1]
    top = _pow2(k)
    wide = logits.dtype not in (torch.bfloat16, torch.float16)
    low, key_min = _KEYS[wide]
    ids = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    lp = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    if n:
        scratch = torch.empty(n, top, dtype=torch.int32, device=logits.device)
        _select_topk[(n,)](logits, gmax, logsum, scratch, ids, lp, vocab, logits.stride(0), k,
                           N_GROUPS=n_groups, NG_POW2=_pow2(n_groups), GROUP=group, K=top,
                           WIDE=wide, LOW=low, KEY_MIN=key_min, num_warps=SELECT_WARPS)
    return ids, lp
