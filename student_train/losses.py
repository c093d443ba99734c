"""Distillation losses on the sparse top-k, per row, in the precision of their inputs.

The teacher is known on its top-k ids S (log-probs captured at temperature 1) plus the mass
``m = 1 - sum_S p`` it puts elsewhere (``tail``: as the codec stored it, else recomputed from
the decoded top-k; ``packing.teacher_tail``). Every sparse loss compares two distributions
over k + 1 buckets, the k ids and "the rest":

* teacher at temperature T, ``missing``:
  - ``zero``: renormalized on S, ``softmax(lp_S / T)``; the rest gets 0.
  - ``tail``: the rest keeps its mass. Tempering needs the tail's shape, which was not
    captured; we take it spread evenly over the ``V - k`` other ids (the maximum-entropy
    completion), whose tempered mass is ``(V-k)^(1-1/T) * m^(1/T)`` before normalization.
    At T = 1 this is exactly ``m``. DistillKit's ``symmetric_uniform`` states the same
    assumption but tempers the tail as one token, ``m^(1/T)``, which at T = 2 and a 49k
    vocabulary understates it about 220-fold.
* student at temperature T: its full softmax; bucket "rest" is its exact mass outside S
  (a log-sum-exp over the other ids, not ``1 - sum``, which loses precision when small).
  Under ``zero`` the reverse KL would be infinite wherever the student has mass outside S,
  so it compares the student renormalized on S; forward KL, JSD and TVD use the student's
  real tail bucket, which makes them the exact full-vocabulary values against the
  renormalized teacher.

Losses (per row; the caller sums and normalizes; sparse losses are scaled by T^2 so their
gradients keep their size across temperatures, as in DistillKit):
``kl`` = KL(teacher || student), ``reverse_kl`` = KL(student || teacher),
``jsd`` = (KL(t || M) + KL(s || M)) / 2 with M the mean, ``tvd`` = sum |t - s| / 2,
``ce`` = next-token cross-entropy (T = 1), ``hidden_cosine`` = 1 - cos(proj(h_s), h_t),
``hidden_mse`` = mean over dimensions of (proj(h_s) - h_t)^2.

``sampled`` trains on the sampled signal instead (codec ``ids: sampled``): a row holds ids
drawn from the teacher at the capture's temperature T, with weights ``count / draws``, an
unbiased estimate of the teacher's distribution. ``sum_j w_j (-log q_T(id_j))`` is then an
unbiased estimate of the cross-entropy H(p_T, q_T) over the full vocabulary, and its
gradient of the gradient of KL(p_T || q_T), which differs from it by the teacher's entropy,
a constant (Anshumann et al., "Sparse Logit Sampling", ACL 2025). A top-k renormalized
teacher is biased however many ids it keeps. Scaled by T^2 as the sparse losses are.

``losses_reference.py`` computes each of them directly on full-vocabulary float64
distributions; the tests hold these functions to it, values and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def teacher_buckets(topk_logprobs: torch.Tensor, tail: torch.Tensor, *, temperature: float,
                    missing: str, vocab_size: int) -> torch.Tensor:
    """[R, k] captured log-probs, [R] missing mass -> [R, k + 1] bucket log-probs at T."""
    lp = topk_logprobs / temperature
    k = lp.shape[-1]
    if missing == "tail" and vocab_size > k:
        log_tail = ((1.0 - 1.0 / temperature) * math.log(vocab_size - k)
                    + torch.log(tail.to(lp.dtype)) / temperature)           # -inf where m = 0
    elif missing in ("tail", "zero"):
        log_tail = torch.full_like(lp[:, 0], NEG_INF)
    else:
        raise ValueError(f"unknown missing-mass mode {missing!r}")
    logits = torch.cat([lp, log_tail[:, None]], -1)
    return logits - torch.logsumexp(logits, -1, keepdim=True)


def student_buckets(logits: torch.Tensor, topk_ids: torch.Tensor, *, temperature: float,
                    renormalize: bool = False) -> torch.Tensor:
    """[R, V] student logits -> [R, k + 1] bucket log-probs at T (the full softmax grouped).

    ``renormalize``: the student restricted to S (bucket "rest" is -inf).
    """
    z = logits / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    on_s = z.gather(-1, topk_ids) - lse
    if renormalize:
        on_s = on_s - torch.logsumexp(on_s, -1, keepdim=True)
        rest = torch.full_like(on_s[:, :1], NEG_INF)
    elif topk_ids.shape[-1] >= z.shape[-1]:
        rest = torch.full_like(on_s[:, :1], NEG_INF)
    else:
        outside = z.scatter(-1, topk_ids, NEG_INF)
        rest = torch.logsumexp(outside, -1, keepdim=True) - lse
    return torch.cat([on_s, rest], -1)


def _xlogy_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) with 0 log 0 = 0, finite gradients where p = 0."""
    p = log_p.exp()
    live = p > 0
    safe_p = torch.where(live, log_p, torch.zeros_like(log_p))
    safe_q = torch.where(live, log_q, torch.zeros_like(log_q))
    return (p * (safe_p - safe_q)).sum(-1)


def sparse_divergence(kind: str, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row divergence between bucket log-probs ``t`` (teacher) and ``s`` (student)."""
    if kind == "kl":
        return _xlogy_ratio(t, s)
    if kind == "reverse_kl":
        return _xlogy_ratio(s, t)
    if kind == "jsd":
        m = torch.logaddexp(t, s) - math.log(2.0)
        return 0.5 * (_xlogy_ratio(t, m) + _xlogy_ratio(s, m))
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise ValueError(f"unknown sparse loss {kind!r}")


def sparse_loss(kind: str, logits: torch.Tensor, topk_ids: torch.Tensor,
                topk_logprobs: torch.Tensor, tail: torch.Tensor, *, temperature: float = 1.0,
                missing: str = "zero") -> torch.Tensor:
    """[R] T^2-scaled divergence of every row (rows without a teacher are the caller's to mask)."""
    vocab = logits.shape[-1]
    t = teacher_buckets(topk_logprobs.to(logits.dtype), tail, temperature=temperature,
                        missing=missing, vocab_size=vocab)
    s = student_buckets(logits, topk_ids, temperature=temperature,
                        renormalize=(missing == "zero" and kind == "reverse_kl"))
    return sparse_divergence(kind, t, s) * temperature ** 2


def sampled_loss(logits: torch.Tensor, sample_ids: torch.Tensor, sample_weights: torch.Tensor,
                 *, temperature: float = 1.0) -> torch.Tensor:
    """[R] T^2-scaled sampled cross-entropy ``-sum_j w_j log softmax(logits / T)[id_j]``;
    padding entries carry weight 0 (their ids may be anything in the vocabulary)."""
    z = logits / temperature
    log_q = z.gather(-1, sample_ids) - torch.logsumexp(z, -1, keepdim=True)
    return -(sample_weights.to(log_q.dtype) * log_q).sum(-1) * temperature ** 2


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[R] next-token cross-entropy; 0 where the label is negative (no next token)."""
    return F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * (labels >= 0)


def hidden_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[N] per-position hidden-state loss between [N, H] tensors (already projected)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if kind == "hidden_cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if kind == "hidden_mse":
        return (student - teacher).pow(2).mean(-1)
    raise ValueError(f"unknown hidden loss {kind!r}")
