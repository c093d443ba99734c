"""Exact top-k log-probabilities, ties broken by token id, without a float32 vocabulary copy.

The order is the logits' own: (logit desc, token id asc). ``torch.topk`` leaves the order of
equal values unspecified and a float32 ``log_softmax`` both costs several passes over
``[tokens, vocab]`` and merges logits that differ by less than its rounding, so neither is used
on the whole row.

One pass over the logits (a Triton kernel on CUDA, torch elsewhere) yields each row's float32
log-normalizer and the maximum of every group of ``group`` (``GROUP``) consecutive ids. The top k groups,
ranked by (group maximum desc, group index asc), hold the exact top k: an element outside them
is outranked by the maximum of each of those k groups (a larger value, or the same value at a
smaller id). The final top-k runs over those k groups' ids only, laid out in id order, on
integer keys that encode (value, inverted position) and are therefore totally ordered: int32
for 16-bit logits (their 16 bits, then 16 of position), int64 otherwise. On CUDA a second
Triton kernel does all of that in registers (``topk_kernel``); torch does it elsewhere, and on
CUDA for shapes too large for registers. Every shape is fixed by the input's, so nothing is read
back to the host: on a GPU the forward that feeds it runs on, queued.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
import torch.nn.functional as F

GROUP = 64
_SIXTEEN_BITS = (torch.bfloat16, torch.float16)


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Integers whose order is the order of ``x``'s values (non-NaN; -0 equals +0): int32 from a
    16-bit float's bits, int64 from a float32's."""
    if x.dtype in _SIXTEEN_BITS:
        bits, magnitude = x.contiguous().view(torch.int16).to(torch.int32), 0x7FFF
    else:
        bits, magnitude = x.float().contiguous().view(torch.int32).to(torch.int64), 0x7FFFFFFF
    # sign and magnitude: a negative value ranks by its magnitude, reversed
    return torch.where(bits < 0, -(bits & magnitude), bits)


def _topk_by_key(values: torch.Tensor, ids: torch.Tensor, k: int,
                 id_bound: int) -> torch.Tensor:
    """Positions of the top k of ``values`` in (value desc, id asc) order; ``ids`` (broadcast
    against ``values``) lie in 0..id_bound-1."""
    if values.dtype in _SIXTEEN_BITS and id_bound <= 1 << 16:
        key = ordered_bits(values) * (1 << 16) + ((1 << 16) - 1 - ids.to(torch.int32))
    else:
        key = ordered_bits(values.float()) * (1 << 32) + ((1 << 32) - 1 - ids.to(torch.int64))
    return torch.topk(key, k, dim=-1, sorted=True).indices


def logsum_and_group_max(logits: torch.Tensor,
                         group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, float32 ``log(sum(exp(x - max(x))))`` ``[N]`` and the maxima of the groups of
    ``group`` ids ``[N, ceil(V / group)]`` (whose maximum is the row's). Log-probs are then formed as
    ``log_softmax`` forms them, ``(x - max) - logsum``, exact to the float32 rounding of the top
    values rather than to that of a log-sum-exp near the logits' magnitude."""
    if logits.is_cuda and triton_available():
        from .topk_kernel import logsum_and_group_max_cuda
        return logsum_and_group_max_cuda(logits, group)
    x = logits.float()
    pad = -x.shape[-1] % group
    gmax = F.pad(x, (0, pad), value=float("-inf")) if pad else x
    gmax = gmax.view(x.shape[0], -1, group).amax(-1)
    return (x - gmax.amax(-1, keepdim=True)).exp().sum(-1).log(), gmax


def topk_logprobs(logits: torch.Tensor, k: int,
                  group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs of ``logits`` [N, V] (any float dtype), computed in float32.

    Returns (ids int64 [N, k], log-probs float32 [N, k]), descending, ties by id. ``group``
    trades the groups' ranking (V / group of them) against the candidates' (k x group); the
    result is the same for every group size.
    """
    n, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k {k} outside 1..{vocab}")
    if group < 1 or group & (group - 1):
        raise ValueError(f"group size {group} is not a power of two")
    logsum, gmax = logsum_and_group_max(logits, group)
    if logits.is_cuda and triton_available():
        from .topk_kernel import select_fits, select_topk_cuda
        if select_fits(k, gmax.shape[1], group):
            return select_topk_cuda(logits, logsum, gmax, k, group)
    return select_topk(logits, logsum, gmax, k, group)


def select_topk(logits: torch.Tensor, logsum: torch.Tensor, gmax: torch.Tensor, k: int,
                group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k from ``logsum_and_group_max``'s outputs, in torch: ``topk_logprobs`` without
    its CUDA kernel."""
    n, vocab = logits.shape
    n_groups = gmax.shape[1]
    device = logits.device
    if n_groups > k:
        # group maxima are logits (or -inf): exact in the logits' own dtype
        groups = _topk_by_key(gmax.to(logits.dtype), torch.arange(n_groups, device=device), k,
                              n_groups)
        groups = groups.sort(dim=-1).values        # candidates in id order
        cand = (groups[:, :, None] * group + torch.arange(group, device=device)).view(n, -1)
        real = cand < vocab                     # the last group may run past the vocabulary
        vals = logits.gather(1, torch.where(real, cand, 0)).masked_fill(~real, float("-inf"))
        # padding ranks last: -inf, and the largest positions lose every tie
        width = cand.shape[1]
        ids = cand.gather(1, _topk_by_key(vals, torch.arange(width, device=device), k, width))
    else:
        ids = _topk_by_key(logits, torch.arange(vocab, device=device), k, vocab)
    row_max = gmax.amax(-1, keepdim=True)
    return ids, (logits.gather(1, ids).float() - row_max) - logsum[:, None]
