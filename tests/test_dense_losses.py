"""Dense losses against a float64 reference on small tensors; the chunked computation; the
teacher head's rebuild and its artifact."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from kdpipe.compress.dense import TeacherHead
from kdpipe.schemas import DatasetError
from kdpipe.student_train.dense_kl import DenseTerm, dense_losses

V, H_T, H_S, R = 37, 12, 10, 23


def _head(seed: int = 0, norm: str = "rmsnorm") -> TeacherHead:
    g = torch.Generator().manual_seed(seed)
    return TeacherHead(norm=norm, norm_weight=torch.rand(H_T, generator=g) + 0.5, eps=1e-5,
                       weight=torch.randn(V, H_T, generator=g),
                       norm_bias=torch.randn(H_T, generator=g) if norm == "layernorm" else None)


def _teacher_logp64(head: TeacherHead, h: torch.Tensor, T: float) -> torch.Tensor:
    """The rebuild written out in float64, independently of TeacherHead.logits."""
    x = h.double()
    if head.norm == "rmsnorm":
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + head.eps) * head.norm_weight.double()
    else:
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        x = (x - mu) / torch.sqrt(var + head.eps) * head.norm_weight.double() \
            + head.norm_bias.double()
    return torch.log_softmax(x @ head.weight.double().T / T, -1)


def _reference(kind: str, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row divergences of float64 full distributions, as textbook sums."""
    pt, ps = t.exp(), s.exp()
    if kind == "dense_kl":
        return (pt * (t - s)).sum(-1)
    if kind == "dense_reverse_kl":
        return (ps * (s - t)).sum(-1)
    m = 0.5 * (pt + ps)
    return 0.5 * ((pt * (t - m.log())).sum(-1) + (ps * (s - m.log())).sum(-1))


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(R, H_S, generator=g)
    w_s = torch.randn(V, H_S, generator=g) * 0.7
    h_t = torch.randn(R, H_T, generator=g) * 3
    has = torch.rand(R, generator=g) < 0.8
    return h_s, w_s, h_t, has


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("kind", ["dense_kl", "dense_reverse_kl", "dense_jsd"])
@pytest.mark.parametrize("T", [1.0, 2.5, 0.7])
def test_dense_losses_match_float64_reference(kind, T, norm):
    head = _head(norm=norm)
    h_s, w_s, h_t, has = _inputs()
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    got = dense_losses(h_s, w_s, teacher_hidden=h_t, head=head, has_teacher=has,
                       terms=[DenseTerm("x", kind, T)], chunk_size=5)["x"]
    got.backward()
    h64 = h_s.detach().double().requires_grad_(True)
    w64 = w_s.detach().double().requires_grad_(True)
    s = torch.log_softmax(h64 @ w64.T / T, -1)
    want = (_reference(kind, _teacher_logp64(head, h_t, T), s) * T ** 2)[has].sum()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want), rel=2e-5, abs=1e-6)
    torch.testing.assert_close(h_s.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_s.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_chunked_equals_all_at_once_with_gradients():
    head = _head()
    h_s, w_s, h_t, has = _inputs(3)
    terms = [DenseTerm("kl", "dense_kl"), DenseTerm("rkl2", "dense_reverse_kl", 2.0),
             DenseTerm("jsd", "dense_jsd", 1.5), DenseTerm("top1", "dense_top1")]
    results = []
    for chunk in (0, 4, 7):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        out = dense_losses(hs, ws, teacher_hidden=h_t, head=head, has_teacher=has, terms=terms,
                           chunk_size=chunk)
        (out["kl"] + out["rkl2"] + out["jsd"]).backward()
        results.append((out, hs.grad, ws.grad))
    for out, gh, gw in results[1:]:
        for k in out:
            torch.testing.assert_close(out[k], results[0][0][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gh, results[0][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, results[0][2], rtol=1e-5, atol=1e-6)
    t_arg = _teacher_logp64(head, h_t, 1.0).argmax(-1)
    s_arg = (h_s @ w_s.T).argmax(-1)
    assert int(results[0][0]["top1"]) == int(((t_arg == s_arg) & has).sum())


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had while it was active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kind", ["dense_kl", "dense_jsd"])
def test_no_tensor_spans_the_batch_and_the_vocabulary(kind):
    """Chunked, neither pass creates a tensor larger than one chunk's [C, V] logits (so the
    batch's [R, V] logits never exist, forward or backward); all at once, it does."""
    h_s, w_s, h_t, has = _inputs()
    head, chunk = _head(), 16      # C x V above the heads' V x H weights, below R x V
    for size, most in ((chunk, chunk * V), (0, R * V)):
        h = h_s.clone().requires_grad_(True)
        with _LargestTensor() as seen:
            out = dense_losses(h, w_s, teacher_hidden=h_t, head=head, has_teacher=has,
                               terms=[DenseTerm("d", kind, 2.0)], chunk_size=size)["d"]
            out.backward()
        assert seen.numel == most, (size, seen.numel)


def test_identical_distributions_give_zero_and_student_vocab_must_match():
    head = _head()
    _, _, h_t, has = _inputs()
    # a "student" that is the teacher: its normed state and the teacher's head
    x = h_t * torch.rsqrt(h_t.pow(2).mean(-1, keepdim=True) + head.eps) * head.norm_weight
    out = dense_losses(x, head.weight, teacher_hidden=h_t, head=head, has_teacher=has,
                       terms=[DenseTerm("kl", "dense_kl", 3.0), DenseTerm("j", "dense_jsd")])
    assert abs(float(out["kl"])) < 1e-4 and abs(float(out["j"])) < 1e-4
    with pytest.raises(ValueError, match="teacher head has 37 tokens, the student 36"):
        dense_losses(x, head.weight[:36], teacher_hidden=h_t, head=head, has_teacher=has,
                     terms=[DenseTerm("kl", "dense_kl")])


def test_head_artifact_round_trip_and_damage():
    head = _head(norm="layernorm")
    head.logit_scale, head.softcap = 0.5, 30.0
    back = TeacherHead.from_bytes(head.to_bytes(), "x")
    h = torch.randn(5, H_T)
    assert torch.equal(back.logits(h), head.logits(h))
    assert (back.norm, back.eps, back.logit_scale, back.softcap) == ("layernorm", 1e-5, 0.5, 30.0)
    with pytest.raises(DatasetError, match="DS/artifacts/h: not a readable teacher head"):
        TeacherHead.from_bytes(head.to_bytes()[:-7], "DS/artifacts/h")


def _cuda_case(rows: int, vocab: int = 32000, width: int = 256):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    h_s = (torch.randn(rows, width, generator=g)).to(dev).requires_grad_(True)
    w_s = (torch.randn(vocab, width, generator=g) * width ** -0.5).to(dev).requires_grad_(True)
    h_t = (torch.randn(rows, width, generator=g) * 3).to(dev)
    head = TeacherHead(norm="rmsnorm", norm_weight=torch.rand(width, generator=g) + 0.5, eps=1e-5,
                       weight=torch.randn(vocab, width, generator=g) * width ** -0.5 * 4)
    head = TeacherHead(norm="rmsnorm", norm_weight=head.norm_weight.to(dev, torch.bfloat16),
                       eps=1e-5, weight=head.weight.to(dev, torch.bfloat16))
    return h_s, w_s, h_t, head, torch.ones(rows, dtype=torch.bool, device=dev)


def _cuda_loss_and_peak(h_s, w_s, h_t, head, has, chunk: int) -> tuple[torch.Tensor, int]:
    """The dense KL's forward and backward under bf16 autocast; the peak memory they added."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dense_losses(h_s, w_s, teacher_hidden=h_t, head=head, has_teacher=has,
                           terms=[DenseTerm("kl", "dense_kl", 2.0)], chunk_size=chunk)["kl"]
    out.backward()
    return out.detach(), torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_dense_losses_on_cuda_under_bf16_autocast():
    """As training runs them on a GPU: bf16 autocast, a bf16 teacher head, chunked with
    checkpointing; values and gradients near the float64 reference."""
    h_s, w_s, h_t, head, has = _cuda_case(4096)
    out, _ = _cuda_loss_and_peak(h_s, w_s, h_t, head, has, chunk=512)
    h64 = h_s.detach().double().requires_grad_(True)
    s = torch.log_softmax(h64 @ w_s.detach().double().T / 2.0, -1)
    want = (_reference("dense_kl", _teacher_logp64(head, h_t, 2.0), s) * 4.0).sum()
    want.backward()
    assert float(out) == pytest.approx(float(want), rel=3e-2)
    cos = torch.nn.functional.cosine_similarity(h_s.grad.double().flatten(), h64.grad.flatten(),
                                                dim=0)
    assert float(cos) > 0.99


@pytest.mark.gpu
def test_dense_losses_memory_follows_the_chunk_not_the_batch():
    """The [R, V] logits of the whole batch never exist: with the same chunk, four times the
    rows add only the rows' own activations, not logits; a chunk's working set (both heads'
    logits, log-softmaxes, probabilities and their gradients: about ten [C, V] float32
    tensors) sets the peak."""
    vocab, chunk = 32000, 512
    peaks = {}
    for rows in (4096, 16384):
        _, peaks[rows] = _cuda_loss_and_peak(*_cuda_case(rows, vocab), chunk=chunk)
        torch.cuda.empty_cache()
    print(f"peak MiB: {({r: p / 2**20 for r, p in peaks.items()})}")
    chunk_tensor = chunk * vocab * 4
    assert peaks[16384] < 16 * chunk_tensor
    assert peaks[16384] < 0.5 * 16384 * vocab * 4      # half the batch's float32 logits
    assert peaks[16384] - peaks[4096] < chunk_tensor
