"""The PyTorch KDA ops: chunked form against the literal recurrence, varlen, convs, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdpipe.student_train.model.ops.kda_torch import (chunk_kda, kda, kda_gate, l2norm, recurrent_kda,
                                                      short_conv)


def make_inputs(B, T, H, K, V, dtype=torch.float64, decay=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, K, generator=gen, dtype=dtype)).to(dtype)
    k = l2norm(torch.randn(B, T, H, K, generator=gen, dtype=dtype)).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=dtype)) * decay
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, g, beta


@pytest.mark.parametrize("B,T,H,K,V", [(2, 64, 2, 16, 16), (1, 200, 3, 32, 24), (2, 7, 1, 60, 8)],
                         ids=lambda x: str(x))
def test_chunk_equals_recurrence_float64(B, T, H, K, V):
    q, k, v, g, beta = make_inputs(B, T, H, K, V)
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o_ref, s_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_chunk_equals_recurrence_float32_and_strong_decay_stays_finite():
    q, k, v, g, beta = make_inputs(1, 150, 2, 32, 32, dtype=torch.float32, decay=200.0)
    o_ref, s_ref = recurrent_kda(q, k, v, g, beta, output_final_state=True)
    o, s = chunk_kda(q, k, v, g, beta, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", [chunk_kda, recurrent_kda], ids=["chunk", "recurrent"])
def test_varlen_documents_are_independent(fn):
    q, k, v, g, beta = make_inputs(1, 150, 2, 16, 8)
    cu = torch.tensor([0, 5, 70, 71, 150], dtype=torch.int32)
    h0 = torch.randn(4, 2, 16, 8, dtype=torch.float64)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i in range(4):
        a, b = int(cu[i]), int(cu[i + 1])
        o_i, s_i = recurrent_kda(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                 initial_state=h0[i:i + 1], output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_i, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s[i:i + 1], s_i, rtol=1e-10, atol=1e-10)


def test_chunk_gradients_match_recurrence():
    inputs = [x.requires_grad_() for x in make_inputs(1, 80, 2, 8, 8)]
    h0 = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (recurrent_kda, chunk_kda):
        o, s = fn(*inputs, initial_state=h0, output_final_state=True)
        (o.pow(2).sum() + s.sum()).backward()
        grads.append([x.grad.clone() for x in [*inputs, h0]])
        for x in [*inputs, h0]:
            x.grad = None
    for g_ref, g_chunk in zip(*grads):
        torch.testing.assert_close(g_chunk, g_ref, rtol=1e-9, atol=1e-9)


def test_raw_entry_point_applies_norm_gate_and_sigmoid():
    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 40, 2, 16
    q, k, v, f = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(4))
    b = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    A_log = torch.rand(H, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(H * D, generator=gen, dtype=torch.float64)
    g = -A_log.exp()[:, None] * F.softplus(f + dt_bias.view(H, D))
    torch.testing.assert_close(kda_gate(f, A_log, dt_bias), g)
    ref, _ = recurrent_kda(F.normalize(q, dim=-1, eps=0), F.normalize(k, dim=-1, eps=0), v, g,
                           b.sigmoid())
    for recurrent in (False, True):
        o, _ = kda(q, k, v, f, b, A_log, dt_bias, recurrent=recurrent)
        torch.testing.assert_close(o, ref, rtol=1e-6, atol=1e-6)


def test_short_conv_is_causal_depthwise_conv_with_silu():
    gen = torch.Generator().manual_seed(2)
    D, W, T = 6, 4, 20
    w = torch.randn(D, 1, W, generator=gen, dtype=torch.float64)
    bias = torch.randn(D, generator=gen, dtype=torch.float64)
    x = torch.randn(2, T, D, generator=gen, dtype=torch.float64)
    ref = F.conv1d(x.transpose(1, 2), w, bias, padding=W - 1, groups=D)[..., :T]
    ref = F.silu(ref).transpose(1, 2)
    y, state = short_conv(x, w, bias, output_final_state=True)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(state, x[:, -W:].transpose(1, 2))
    # token by token from the cache
    y0, cache = short_conv(x[:, :7], w, bias, output_final_state=True)
    steps = [y0]
    for t in range(7, T):
        y_t, cache = short_conv(x[:, t:t + 1], w, bias, cache=cache, output_final_state=True)
        steps.append(y_t)
    torch.testing.assert_close(torch.cat(steps, 1), ref)


def test_short_conv_does_not_leak_across_documents():
    gen = torch.Generator().manual_seed(3)
    D, W = 5, 4
    w = torch.randn(D, 1, W, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 20, D, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 2, 9, 20], dtype=torch.int32)
    y, state = short_conv(x, w, cu_seqlens=cu, output_final_state=True)
    for i in range(3):
        a, b = int(cu[i]), int(cu[i + 1])
        y_i, s_i = short_conv(x[:, a:b], w, output_final_state=True)
        torch.testing.assert_close(y[:, a:b], y_i)
        torch.testing.assert_close(state[i:i + 1], s_i)


@pytest.mark.parametrize("fn", [chunk_kda, recurrent_kda], ids=["chunk", "recurrent"])
def test_output_keeps_value_dtype_and_state_is_float32(fn):
    q, k, v, g, beta = (x.to(torch.bfloat16) for x in make_inputs(1, 20, 2, 8, 8))
    o, s = fn(q, k, v, g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
