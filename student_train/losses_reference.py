"""Plain float64 references of the distillation losses, one row at a time, full vocabulary.

Nothing here is fast or clever: each function builds both distributions over all V ids
explicitly, in float64, and applies the textbook formula, so that ``losses.py`` (buckets,
log-sum-exps, chunking) can be checked against it, values and gradients.

The teacher over the full vocabulary:
* ``zero``: ``p[S] = softmax(lp / T)``, 0 elsewhere.
* ``tail``: at T = 1, ``p[S] = exp(lp)`` and the missing mass (given, as a codec stores it,
  else ``1 - sum exp(lp)``) spread evenly over the other ``V - k`` ids; at T, that
  distribution raised to ``1/T``; either way renormalized (a stored mass and quantized
  values need not sum to 1). The losses
  compare the teacher and student after grouping all ids outside S into one bucket
  (the student's bucket is the sum of its probabilities there).
"""

from __future__ import annotations

import torch

F64 = torch.float64


def teacher_full(lp: torch.Tensor, ids: torch.Tensor, vocab: int, *, temperature: float,
                 missing: str, tail: torch.Tensor | None = None) -> torch.Tensor:
    """[k] captured log-probs at ids (and the missing mass, None: recomputed from them) -> [V]
    teacher distribution at temperature T."""
    lp, T = lp.to(F64), float(temperature)
    p = torch.zeros(vocab, dtype=F64)
    if missing == "zero":
        w = torch.exp(lp / T)
        p[ids] = w / w.sum()
        return p
    p1 = torch.zeros(vocab, dtype=F64)
    p1[ids] = torch.exp(lp)
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[ids] = False
    if rest.any():
        m = torch.clamp(1 - torch.exp(lp).sum(), min=0) if tail is None else tail.to(F64)
        p1[rest] = m / rest.sum()
    w = p1 ** (1.0 / T)
    return w / w.sum()


def student_full(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.to(F64) / temperature
    w = torch.exp(z - z.max())
    return w / w.sum()


def _group(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[V] -> [k + 1]: the probabilities at ids, then the sum of all the others."""
    rest = torch.ones(p.shape[0], dtype=torch.bool)
    rest[ids] = False
    return torch.cat([p[ids], p[rest].sum()[None]])


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=F64)
    for pi, qi in zip(p, q):
        if pi > 0:
            total = total + pi * (torch.log(pi) - torch.log(qi))
    return total


def divergence(kind: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Textbook divergence between two distributions (teacher p, student q)."""
    if kind == "kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        m = (p + q) / 2
        return (_kl(p, m) + _kl(q, m)) / 2
    if kind == "tvd":
        return (p - q).abs().sum() / 2
    raise ValueError(kind)


def sparse_loss_row(kind: str, logits: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, *,
                    temperature: float, missing: str,
                    tail: torch.Tensor | None = None) -> torch.Tensor:
    """One row's T^2-scaled loss, computed from explicit full-vocabulary distributions."""
    V = logits.shape[0]
    p = teacher_full(lp, ids, V, temperature=temperature, missing=missing, tail=tail)
    q = student_full(logits, temperature)
    if missing == "zero":
        if kind == "reverse_kl":                  # the student restricted to the teacher's ids
            q_s = torch.zeros(V, dtype=F64)
            q_s[ids] = q[ids] / q[ids].sum()
            q = q_s
        value = divergence(kind, p, q)
    else:
        value = divergence(kind, _group(p, ids), _group(q, ids))
    return value * temperature ** 2


def cross_entropy_row(logits: torch.Tensor, label: int) -> torch.Tensor:
    return -torch.log(student_full(logits, 1.0)[label])


def hidden_loss_row(kind: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.to(F64), t.to(F64)
    if kind == "hidden_cosine":
        return 1 - (s @ t) / (s.norm() * t.norm())
    if kind == "hidden_mse":
        return ((s - t) ** 2).mean()
    raise ValueError(kind)
