"""Losses against the teacher's full distribution, rebuilt from its stored last-layer state.

A dense dataset gives, at every teacher row, the teacher's last-layer output; its final norm
and LM head (``compress.dense.TeacherHead``) turn that into logits over the whole vocabulary.
So, unlike the top-k losses, these compare both full distributions, at any temperature,
exactly: ``dense_kl`` = KL(teacher || student), ``dense_reverse_kl`` = KL(student ||
teacher), ``dense_jsd`` = (KL(t || M) + KL(s || M)) / 2 with M the mean, each scaled by T^2
like the sparse losses.

Both vocabularies' logits exist for ``chunk_size`` rows at a time only: every chunk runs both
heads, the log-softmaxes and the divergences under activation checkpointing, keeping per-term
sums, so memory is O(chunk_size x vocab) forward and backward (the backward pass recomputes
one chunk's logits, the teacher's included, at the price of a second pair of matmuls per
chunk). ``chunk_size=0`` computes everything at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdpipe.compress.dense import TeacherHead

from .train_config import DENSE_LOSSES


@dataclass(frozen=True)
class DenseTerm:
    """A loss against the full teacher distribution; ``kind`` in ``DENSE_LOSSES``, or
    ``dense_top1`` for the count of rows whose student argmax is the teacher's."""

    name: str
    kind: str
    temperature: float = 1.0


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per row sum p (log p - log q), with 0 log 0 = 0 (p underflows to 0 in the far tail)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def dense_divergence(kind: str, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row divergence between full log-prob rows ``t`` (teacher) and ``s`` (student)."""
    if kind == "dense_kl":
        return _kl(t, s)
    if kind == "dense_reverse_kl":
        return _kl(s, t)
    if kind == "dense_jsd":
        m = torch.logaddexp(t, s) - math.log(2.0)
        return 0.5 * (_kl(t, m) + _kl(s, m))
    raise ValueError(f"unknown dense loss {kind!r}")


def _chunk_sums(h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor,
                has_teacher: torch.Tensor, *, head: TeacherHead,
                terms: tuple[DenseTerm, ...]) -> tuple[torch.Tensor, ...]:
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))        # [C, V]
    with torch.no_grad():
        t_logits = head.logits(teacher_h)                                        # [C, V] fp32
    zero = logits.new_zeros(())
    sums, cache = [], {}
    for term in terms:
        if term.kind == "dense_top1":
            agree = (logits.argmax(-1) == t_logits.argmax(-1)) & has_teacher
            sums.append(agree.sum().to(logits.dtype))
            continue
        T = term.temperature
        if T not in cache:
            cache[T] = (torch.log_softmax(t_logits / T, -1),
                        torch.log_softmax(logits / T, -1))
        per_row = dense_divergence(term.kind, *cache[T]) * T ** 2
        sums.append(torch.where(has_teacher, per_row, zero).sum())
    return tuple(sums)


def dense_losses(hidden: torch.Tensor, weight: torch.Tensor, *, teacher_hidden: torch.Tensor,
                 head: TeacherHead, has_teacher: torch.Tensor, terms: list[DenseTerm],
                 chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Sums over rows of every dense term.

    Args:
        hidden: [R, H_s] the student's final (normed) hidden states of the loss rows.
        weight: [V, H_s] the student's LM head weight.
        teacher_hidden: [R, H_t] the teacher's last-layer outputs at the same rows (before
            its final norm, as a dense dataset stores them).
        head: the teacher's final norm and LM head, on the same device.
        has_teacher: [R] bool, rows with a teacher row.
    Returns: {term.name: sum over rows}.
    """
    unknown = [t.kind for t in terms if t.kind not in DENSE_LOSSES + ("dense_top1",)]
    if unknown:
        raise ValueError(f"unknown dense loss {unknown[0]!r}")
    if head.vocab_size != weight.shape[0]:
        raise ValueError(f"the teacher head has {head.vocab_size} tokens, the student "
                         f"{weight.shape[0]}")
    terms = tuple(terms)
    fn = partial(_chunk_sums, head=head, terms=terms)
    R = hidden.shape[0]
    step = R if chunk_size <= 0 else chunk_size
    totals = None
    for lo in range(0, max(R, 1), max(step, 1)):
        sl = slice(lo, lo + step)
        args = (hidden[sl], weight, teacher_hidden[sl], has_teacher[sl])
        if chunk_size > 0 and torch.is_grad_enabled() and R > step:
            sums = checkpoint(fn, *args, use_reentrant=False)
        else:
            sums = fn(*args)
        totals = list(sums) if totals is None else [a + b for a, b in zip(totals, sums)]
    return dict(zip([t.name for t in terms], totals))
