"""Every distillation loss against a direct float64 full-vocabulary computation, values and
gradients, for each missing-mass mode and several temperatures; the chunked LM-head path
against the unchunked one."""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.student_train import losses_reference as ref
from kdpipe.student_train.losses import hidden_loss, sparse_loss, teacher_buckets
from kdpipe.student_train.sparse_kl import HeadTerm, head_losses

V, K, R = 37, 5, 6
SPARSE = ["kl", "reverse_kl", "jsd", "tvd"]


def _teacher(seed: int, rows: int = R, k: int = K, vocab: int = V):
    """Rank-ordered top-k of random teacher distributions (log-probs at T=1)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2, -1)
    lps, ids = full.topk(k, dim=-1)
    tail = (1 - lps.exp().sum(-1)).clamp(min=0)
    return ids, lps, tail


def _logits(seed: int, rows: int = R, vocab: int = V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 1.5).to(dtype)


@pytest.mark.parametrize("missing", ["zero", "tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("kind", SPARSE)
def test_sparse_loss_matches_float64_reference(kind, temperature, missing):
    ids, lps, tail = _teacher(1)
    z = _logits(2).requires_grad_(True)
    got = sparse_loss(kind, z, ids, lps, tail, temperature=temperature, missing=missing)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    z_ref = z.detach().clone().requires_grad_(True)
    want = torch.stack([ref.sparse_loss_row(kind, z_ref[r], ids[r], lps[r],
                                            temperature=temperature, missing=missing)
                        for r in range(R)])
    (g_want,) = torch.autograd.grad(want.sum(), z_ref)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def _stored_tail(tail: torch.Tensor, seed: int) -> torch.Tensor:
    """A missing mass as a lossy codec stores it: off from 1 - sum(p), either way."""
    g = torch.Generator().manual_seed(seed)
    return tail * (0.5 + torch.rand(tail.shape, generator=g, dtype=tail.dtype))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("kind", SPARSE)
def test_stored_tail_matches_float64_reference_given_the_same_tail(kind, temperature):
    """``missing: tail`` with a stored mass that is not 1 - sum(p): the loss is the reference
    computed from that same mass (values and gradients), not from the recomputed one."""
    ids, lps, tail = _teacher(13)
    stored = _stored_tail(tail, 14)
    z = _logits(15).requires_grad_(True)
    got = sparse_loss(kind, z, ids, lps, stored, temperature=temperature, missing="tail")
    (g_got,) = torch.autograd.grad(got.sum(), z)
    z_ref = z.detach().clone().requires_grad_(True)
    want = torch.stack([ref.sparse_loss_row(kind, z_ref[r], ids[r], lps[r], tail=stored[r],
                                            temperature=temperature, missing="tail")
                        for r in range(R)])
    (g_want,) = torch.autograd.grad(want.sum(), z_ref)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    recomputed = sparse_loss(kind, z.detach(), ids, lps, tail, temperature=temperature,
                             missing="tail")
    assert not torch.allclose(got.detach(), recomputed, rtol=1e-6, atol=0)


@pytest.mark.parametrize("missing", ["zero", "tail"])
@pytest.mark.parametrize("kind", SPARSE)
def test_sparse_loss_float32_close_to_reference(kind, missing):
    ids, lps, tail = _teacher(3)
    z = _logits(4, dtype=torch.float32)
    got = sparse_loss(kind, z, ids, lps.float(), tail.float(), temperature=2.0, missing=missing)
    want = torch.stack([ref.sparse_loss_row(kind, z[r].double(), ids[r], lps[r],
                                            temperature=2.0, missing=missing) for r in range(R)])
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_tail_mode_at_t1_is_the_captured_mass_and_zero_renormalizes():
    ids, lps, tail = _teacher(5)
    t = teacher_buckets(lps, tail, temperature=1.0, missing="tail", vocab_size=V)
    torch.testing.assert_close(t[:, :K], lps)
    torch.testing.assert_close(t[:, K].exp(), tail)
    z = teacher_buckets(lps, tail, temperature=1.0, missing="zero", vocab_size=V)
    torch.testing.assert_close(z[:, :K].exp().sum(-1), torch.ones(R, dtype=torch.float64))
    assert torch.isneginf(z[:, K]).all()


def test_tail_tempering_spreads_the_mass_not_one_token():
    """At T=2 the tail bucket holds (V-k)^(1/2) m^(1/2) before normalization, not m^(1/2)."""
    ids, lps, tail = _teacher(6, rows=1)
    t = teacher_buckets(lps, tail, temperature=2.0, missing="tail", vocab_size=V)
    unnorm = torch.cat([(lps / 2).exp(), (math.sqrt(V - K) * tail.sqrt())[:, None]], -1)
    torch.testing.assert_close(t.exp(), unnorm / unnorm.sum(-1, keepdim=True))


def test_identical_distributions_give_zero():
    """A student equal to the teacher (tail mode at T=1: uniform tail) has zero loss."""
    ids, lps, tail = _teacher(7, rows=2)
    full = torch.stack([ref.teacher_full(lps[r], ids[r], V, temperature=1.0, missing="tail")
                        for r in range(2)])
    for kind in SPARSE:
        for T in (1.0, 3.0):
            v = sparse_loss(kind, full.log(), ids, lps, tail, temperature=T, missing="tail")
            torch.testing.assert_close(v, torch.zeros(2, dtype=torch.float64), atol=1e-12,
                                       rtol=0)


def test_k_equal_to_vocab_has_no_tail():
    ids, lps, tail = _teacher(8, k=V)
    z = _logits(9).requires_grad_(True)
    for missing in ("zero", "tail"):
        for kind in SPARSE:
            v = sparse_loss(kind, z, ids, lps, tail, temperature=2.0, missing=missing)
            (g,) = torch.autograd.grad(v.sum(), z)
            assert torch.isfinite(v).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("kind", ["hidden_cosine", "hidden_mse"])
def test_hidden_losses_match_reference(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 11, generator=g, dtype=torch.float64)
    got = hidden_loss(kind, s, t)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    s2 = s.detach().clone().requires_grad_(True)
    want = torch.stack([ref.hidden_loss_row(kind, s2[i], t[i]) for i in range(7)])
    (g_want,) = torch.autograd.grad(want.sum(), s2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


TERMS = [HeadTerm("kl", "kl", 2.0, "tail"), HeadTerm("rkl", "reverse_kl", 1.0, "zero"),
         HeadTerm("jsd", "jsd", 1.5, "zero"), HeadTerm("tvd", "tvd", 1.0, "tail"),
         HeadTerm("ce", "ce")]


def _head_inputs(dtype, rows=23, hidden=9):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(V, hidden, generator=g, dtype=torch.float64).to(dtype)
    ids, lps, tail = _teacher(12, rows=rows)
    has = torch.rand(rows, generator=g) < 0.8
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[::5] = -100
    return h, w, dict(topk_ids=ids * has[:, None], topk_logprobs=(lps * has[:, None]).to(dtype),
                      tail=(_stored_tail(tail, 13) * has).to(dtype), has_teacher=has,
                      labels=labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_chunked_head_equals_unchunked(dtype, chunk):
    h, w, tg = _head_inputs(dtype)
    results = []
    for size in (0, chunk):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        sums = head_losses(hh, ww, terms=TERMS, chunk_size=size, top1=True, **tg)
        total = sum(v for k, v in sums.items() if k != "top1")
        total.backward()
        results.append((sums, hh.grad, ww.grad))
    (a, ga_h, ga_w), (b, gb_h, gb_w) = results
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol)
    torch.testing.assert_close(ga_h, gb_h, **tol)
    torch.testing.assert_close(ga_w, gb_w, **tol)


def test_head_losses_match_reference_rows():
    h, w, tg = _head_inputs(torch.float64, rows=8)
    sums = head_losses(h, w, terms=TERMS, chunk_size=3, top1=True, **tg)
    logits = h @ w.T
    for term in TERMS:
        want = torch.zeros((), dtype=torch.float64)
        for r in range(8):
            if term.kind == "ce":
                if tg["labels"][r] >= 0:
                    want = want + ref.cross_entropy_row(logits[r], int(tg["labels"][r]))
            elif tg["has_teacher"][r]:
                want = want + ref.sparse_loss_row(
                    term.kind, logits[r], tg["topk_ids"][r], tg["topk_logprobs"][r],
                    tail=tg["tail"][r], temperature=term.temperature, missing=term.missing)
        torch.testing.assert_close(sums[term.name], want, rtol=1e-10, atol=1e-12)
    agree = ((logits.argmax(-1) == tg["topk_ids"][:, 0]) & tg["has_teacher"]).sum()
    assert int(sums["top1"]) == int(agree)


def test_no_rows_still_connects_the_graph():
    h, w, tg = _head_inputs(torch.float32, rows=0)
    w.requires_grad_(True)
    sums = head_losses(h, w, terms=TERMS, chunk_size=4, **tg)
    sum(sums.values()).backward()
    assert w.grad is not None and not w.grad.any()
