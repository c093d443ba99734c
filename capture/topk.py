"""Exact top-k of log-probabilities, ties broken by token id, on any device.

``torch.topk`` leaves the order of equal values unspecified, so a capture could
differ between runs, devices or backends exactly where the teacher is undecided.
The fast path takes the top k+1 and reorders the first k by (value desc, id asc);
that set is exact unless the k-th and (k+1)-th values are equal. Only those rows take
the slow path: each float32 value and its id packed into one int64 key (the value's
bits mapped to an order-preserving integer in the high word, the inverted id in the
low word), whose top-k is a total order.
"""

from __future__ import annotations

import torch

_LOW = 1 << 32


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 whose order equals the float32 order of ``x`` (for non-NaN values)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    # negative floats: larger magnitude = smaller value, so flip their magnitude bits
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _topk_by_key(lp: torch.Tensor, k: int) -> torch.Tensor:
    ids = torch.arange(lp.shape[-1], device=lp.device, dtype=torch.int64)
    key = _ordered_bits(lp) * _LOW + (_LOW - 1 - ids)
    return torch.topk(key, k, dim=-1, sorted=True).indices


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs of ``logits`` [N, V] computed in float32.

    Returns (ids int64 [N, k], log-probs float32 [N, k]), descending, ties by id.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    vocab = lp.shape[-1]
    k1 = min(k + 1, vocab)
    vals, ids = torch.topk(lp, k1, dim=-1, sorted=True)
    boundary_tie = vals[:, k - 1] == vals[:, k] if k1 > k else torch.zeros_like(vals[:, 0],
                                                                                 dtype=torch.bool)
    vals, ids = vals[:, :k], ids[:, :k]
    by_id = ids.argsort(dim=-1)
    ids, vals = ids.gather(-1, by_id), vals.gather(-1, by_id)
    by_val = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    ids = ids.gather(-1, by_val)
    if bool(boundary_tie.any()):
        rows = boundary_tie.nonzero().squeeze(-1)
        ids[rows] = _topk_by_key(lp[rows], k)
    return ids, lp.gather(-1, ids)
