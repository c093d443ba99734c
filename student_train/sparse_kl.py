"""The LM head and every loss on its output, computed in chunks of positions.

Materializing float32 logits for a whole batch costs ``positions x vocab x 4`` bytes (16k
positions x 128k vocab = 8 GiB, twice that with the log-softmax). ``head_losses`` instead
runs the LM head, the log-softmax and the top-k gathers on ``chunk_size`` positions at a
time and keeps only per-loss sums. Each chunk runs under activation checkpointing, so the
backward pass recomputes one chunk's logits at a time as well: memory is
O(chunk_size x vocab) both ways, at the price of a second LM-head matmul per chunk.
``chunk_size=0`` computes everything at once (the reference the tests compare with).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .losses import cross_entropy, sampled_loss, sparse_loss


@dataclass(frozen=True)
class HeadTerm:
    """A loss on the LM head's output: ``kind`` in kl, reverse_kl, jsd, tvd, sampled, ce."""

    name: str
    kind: str
    temperature: float = 1.0
    missing: str = "zero"


def _chunk_sums(h: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor,
                topk_logprobs: torch.Tensor, tail: torch.Tensor, has_teacher: torch.Tensor,
                labels: torch.Tensor, sample_ids: torch.Tensor, sample_weights: torch.Tensor,
                *, terms: tuple[HeadTerm, ...], top1: bool) -> tuple[torch.Tensor, ...]:
    logits = F.linear(h, weight)                                     # [C, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    sums = []
    for term in terms:
        if term.kind == "ce":
            sums.append(cross_entropy(logits, labels).sum())
        elif term.kind == "sampled":
            per_row = sampled_loss(logits, sample_ids, sample_weights,
                                   temperature=term.temperature)
            sums.append(torch.where(has_teacher, per_row, zero).sum())
        else:
            per_row = sparse_loss(term.kind, logits, topk_ids, topk_logprobs, tail,
                                  temperature=term.temperature, missing=term.missing)
            sums.append(torch.where(has_teacher, per_row, zero).sum())
    if top1:
        agree = (logits.argmax(-1) == topk_ids[:, 0]) & has_teacher
        sums.append(agree.sum().to(logits.dtype))
    return tuple(sums)


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, *, topk_ids: torch.Tensor,
                topk_logprobs: torch.Tensor, tail: torch.Tensor, has_teacher: torch.Tensor,
                labels: torch.Tensor, terms: list[HeadTerm], chunk_size: int = 1024,
                top1: bool = False, sample_ids: torch.Tensor | None = None,
                sample_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums over rows of every head loss (and of top-1 agreement with the teacher).

    Args:
        hidden: [R, H] final (normed) hidden states of the loss rows.
        weight: [V, H] LM head weight.
        topk_ids / topk_logprobs: [R, k] teacher top-k (rank order) and log-probs.
        tail: [R] teacher mass outside the top-k; has_teacher: [R] bool.
        labels: [R] next-token ids, negative where there is none.
        sample_ids / sample_weights: [R, m] sampled signal (distinct drawn ids, count /
            draws), needed by ``sampled`` terms only.
    Returns: {term.name: sum over rows} (plus ``top1``: number of rows whose student argmax
    is the teacher's top-1 id).
    """
    terms = tuple(terms)
    fn = partial(_chunk_sums, terms=terms, top1=top1)
    R = hidden.shape[0]
    if sample_ids is None:
        sample_ids = torch.zeros(R, 0, dtype=torch.long, device=hidden.device)
        sample_weights = torch.zeros(R, 0, device=hidden.device)
    step = R if chunk_size <= 0 else chunk_size
    totals = None
    for lo in range(0, max(R, 1), max(step, 1)):
        sl = slice(lo, lo + step)
        args = (hidden[sl], weight, topk_ids[sl], topk_logprobs[sl], tail[sl],
                has_teacher[sl], labels[sl], sample_ids[sl], sample_weights[sl])
        if chunk_size > 0 and torch.is_grad_enabled() and R > step:
            sums = checkpoint(fn, *args, use_reentrant=False)
        else:
            sums = fn(*args)
        totals = list(sums) if totals is None else [a + b for a, b in zip(totals, sums)]
    names = [t.name for t in terms] + (["top1"] if top1 else [])
    return dict(zip(names, totals))
