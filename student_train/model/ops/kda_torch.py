"""Kimi Delta Attention in plain PyTorch: the literal recurrence and the chunked form.

Per head, with the state ``S`` of shape ``[K, V]`` kept in float32:

    S_t = diag(exp(g_t)) S_{t-1}                       per-key-channel decay, g_t <= 0
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T          delta rule, beta_t in (0, 1)
    o_t = S_t^T (scale q_t)

with ``q``, ``k`` L2-normalised. This is the math of fla's KDA kernels (``chunk_kda`` /
``fused_recurrent_kda`` with the in-kernel L2 norm, gate and beta sigmoid); the model runs this
module wherever fla cannot (no CUDA) and the GPU tests hold the two to each other.

- ``recurrent_kda``: a loop over time. It is the reference, and it serves decoding, where a
  step is a single token.
- ``chunk_kda``: chunks of 64 tokens. Inside a chunk the delta rule is a unit lower-triangular
  system (the WY/UT form): with the in-chunk cumulative decay ``G`` and
  ``A[s, r] = sum_d k_s[d] k_r[d] exp(G_s[d] - G_r[d])`` for ``r < s``, the corrected values are
  ``U = (I + diag(beta) A)^{-1} diag(beta) (V - (K * exp G) S_0)``. Only the loop over chunks is
  sequential: 2048 tokens with 4 heads of 128 take about half a second on one CPU core.
  Every ``exp`` takes a non-positive argument (sub-chunks of 16 use a reference row between the
  two tokens), so strong decay underflows to zero instead of overflowing.

Shapes follow fla: ``q, k, g``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; ``beta``: ``[B, T, H]``;
state: ``[N, H, K, V]``. With ``cu_seqlens`` (int ``[N+1]``) the batch must be 1 and holds N
documents back to back; each starts from its own initial state and none sees another.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in float32 or wider (as fla's kernel)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def kda_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log-space decay ``-exp(A_log[h]) * softplus(g + dt_bias)``; ``g``: ``[..., H, K]``."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    H = g.shape[-2]
    g = g.to(dtype) + dt_bias.to(dtype).view(H, -1)
    return -A_log.to(dtype).exp().view(H, 1) * F.softplus(g)


def kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        A_log: torch.Tensor, dt_bias: torch.Tensor, *, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
        recurrent: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA from raw projections, the same contract as ``ops.kda_fla.kda``.

    ``q``, ``k`` are normalised here, ``g`` is the raw gate input (``f_proj`` output) and ``beta``
    the raw logits (``b_proj`` output). ``recurrent`` picks the token loop (cheap for a few
    tokens) over the chunked form; both compute the same function.
    """
    fn = recurrent_kda if recurrent else chunk_kda
    return fn(l2norm(q), l2norm(k), v, kda_gate(g, A_log, dt_bias),
              torch.sigmoid(beta.to(torch.promote_types(beta.dtype, torch.float32))),
              initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)


def _accumulator_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _DocumentRows:
    """Packed documents ``[1, total, ...]`` as zero-padded rows ``[N, width, ...]``, and back.

    Padding sits at the end of each row, so a row's causal computation is its document's.
    """

    def __init__(self, cu_seqlens: torch.Tensor, x: torch.Tensor) -> None:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs a batch of 1 packed row, got batch {x.shape[0]}")
        starts = cu_seqlens[:-1].long().to(x.device)
        self.lengths = cu_seqlens.diff().long().to(x.device)
        offsets = torch.arange(int(self.lengths.max()), device=x.device)
        self.valid = offsets[None] < self.lengths[:, None]                           # [N, width]
        self.index = (starts[:, None] + offsets[None]).clamp(max=x.shape[1] - 1)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[0][self.index]
        mask = self.valid.view(*self.valid.shape, *([1] * (rows.dim() - 2)))
        return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    def unpad(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self.valid].unsqueeze(0)


def _over_documents(fn: Callable, cu_seqlens: torch.Tensor, q, k, v, g, beta, *,
                    initial_state, output_final_state, **kwargs):
    """Run a KDA function on packed documents as a padded batch, one row per document.

    A padding step has ``k = v = g = beta = 0``: it neither decays nor writes the state, so each
    row ends in its document's final state.
    """
    rows = _DocumentRows(cu_seqlens, q)
    if initial_state is not None and initial_state.shape[0] != rows.lengths.numel():
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for "
                         f"{rows.lengths.numel()} documents")
    o, state = fn(rows.pad(q), rows.pad(k), rows.pad(v), rows.pad(g), rows.pad(beta),
                  initial_state=initial_state, output_final_state=output_final_state, **kwargs)
    return rows.unpad(o), state


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               cache: torch.Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution followed by SiLU (fla's ``ShortConvolution`` math).

    ``x``: ``[B, T, D]``; ``weight``: ``[D, 1, W]``; ``cache``: ``[N, D, W]``, the last W inputs
    of each sequence (fla's layout), which stand before the first new token. Returns the output
    and, if asked, the updated cache. With ``cu_seqlens`` no document sees another's inputs.
    """
    if cu_seqlens is not None:
        rows = _DocumentRows(cu_seqlens, x)
        y, state = _short_conv_rows(rows.pad(x), weight, bias, cache, rows.lengths,
                                    output_final_state)
        return rows.unpad(y), state
    lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    return _short_conv_rows(x, weight, bias, cache, lengths, output_final_state)


def _short_conv_rows(x, weight, bias, cache, lengths, output_final_state):
    B, T, D = x.shape
    W = weight.shape[-1]
    history = x.new_zeros(B, W, D) if cache is None else cache.to(x.dtype).transpose(1, 2)
    full = torch.cat([history, x], 1)                                         # [B, W + T, D]
    # Tap j multiplies the input W-1-j steps back; W shifted products beat a depthwise conv1d
    # call for these small widths.
    taps = weight.to(x.dtype).squeeze(1)                                      # [D, W]
    y = sum(full[:, 1 + j:1 + j + T] * taps[:, j] for j in range(W))
    if bias is not None:
        y = y + bias.to(x.dtype)
    y = F.silu(y)
    if not output_final_state:
        return y, None
    # The last W inputs of row b end at its true length (rows may carry end padding).
    index = (lengths[:, None] + torch.arange(W, device=x.device)[None])[..., None].expand(B, W, D)
    return y, full.gather(1, index).transpose(1, 2).contiguous()


def recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, *, scale: float | None = None,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule one token at a time (normalised q/k, log decay g, beta in (0, 1))."""
    if cu_seqlens is not None:
        return _over_documents(recurrent_kda, cu_seqlens, q, k, v, g, beta, scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, acc = v.dtype, _accumulator_dtype(v)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):                          # S: [B, H, K, V]; contractions over K
        S = S * g[:, t, ..., None].exp()
        k_t = k[:, t, ..., None]
        error = v[:, t] - (k_t * S).sum(-2)
        S = S + k_t * beta[:, t, :, None, None] * error[..., None, :]
        outputs.append((q[:, t, ..., None] * scale * S).sum(-2))
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor,
                        G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decayed scores inside each chunk: ``A_qk`` for ``r <= s`` and ``A_kk`` for ``r < s``.

    ``X[s, r] = sum_d x_s[d] k_r[d] exp(G_s[d] - G_r[d])``, zero above the diagonal; ``q``, ``k``,
    ``G``: ``[..., C, K]`` with ``G`` non-increasing along ``C``; results ``[..., C, C]``.
    The chunk is cut into sub-chunks of 16 rows. Against earlier sub-chunks the decay is split at
    the first row of the current one, which lies between r and s, so both factors are <= 1 and
    the product is a matmul; within a sub-chunk the decay is taken pairwise.
    """
    *lead, C, K = G.shape
    c = math.gcd(C, SUB_CHUNK_SIZE)
    nb = C // c
    device = G.device
    neg_inf = torch.tensor(float("-inf"), dtype=G.dtype, device=device)
    Gb = G.reshape(*lead, nb, c, K)
    ref = Gb[..., :1, :]                                                      # [..., nb, 1, K]
    block_of_column = torch.arange(C, device=device) // c
    earlier = block_of_column[None, :] < torch.arange(nb, device=device)[:, None]   # [nb, C]
    to_ref = torch.where(earlier[..., None], ref - G[..., None, :, :], neg_inf)  # [..., nb, C, K]
    k_earlier = (k[..., None, :, :] * to_ref.exp()).transpose(-1, -2)          # [..., nb, K, C]
    from_ref = (Gb - ref).exp()                                               # [..., nb, c, K]
    # Within a sub-chunk: exp(min(G_s - G_r, 0)); entries with r > s are dropped by the tril below.
    kb = k.reshape(*lead, nb, c, K)
    pairwise_decay = (Gb[..., :, None, :] - Gb[..., None, :, :]).clamp(max=0).exp()
    k_pairwise = kb[..., None, :, :] * pairwise_decay                        # [..., nb, c, c, K]
    # Scatter each sub-chunk's diagonal block to its own columns: [nb, c, c] -> [nb, c, nb, c].
    own_block = torch.eye(nb, dtype=G.dtype, device=device).view(nb, 1, nb, 1)

    def scores(x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(*lead, nb, c, K)
        earlier_part = (xb * from_ref) @ k_earlier                            # [..., nb, c, C]
        diagonal = (k_pairwise @ xb[..., None]).squeeze(-1)                   # [..., nb, c, c]
        full = earlier_part.reshape(*lead, nb, c, nb, c) + diagonal.unsqueeze(-2) * own_block
        return full.reshape(*lead, C, C)

    return scores(q).tril(), scores(k).tril(-1)


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
              beta: torch.Tensor, *, scale: float | None = None,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: torch.Tensor | None = None,
              chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule chunk by chunk (same inputs and result as ``recurrent_kda``)."""
    if cu_seqlens is not None:
        return _over_documents(chunk_kda, cu_seqlens, q, k, v, g, beta, scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               chunk_size=chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, acc = v.dtype, _accumulator_dtype(v)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    NT = max(1, -(-T // C))
    pad = NT * C - T
    # Zero padding at the end leaves the state untouched (no decay, no write).
    q, k, v, g = (F.pad(x.to(acc), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta.to(acc), (0, 0, 0, pad))

    def chunks(x: torch.Tensor) -> torch.Tensor:     # [B, NT*C, H, D] -> [B, H, NT, C, D]
        return x.reshape(B, NT, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = chunks(q) * scale, chunks(k), chunks(v), chunks(g)
    beta = beta.reshape(B, NT, C, H).permute(0, 3, 1, 2)        # [B, H, NT, C]
    G = g.cumsum(-2)
    A_qk, A_kk = _intra_chunk_scores(q, k, G)
    # (I + diag(beta) A_kk) [u | w] = diag(beta) [V | K exp(G)]: u and w are the WY factors.
    rhs = torch.cat([v, k * G.exp()], -1) * beta[..., None]
    uw = torch.linalg.solve_triangular(beta[..., None] * A_kk, rhs, upper=False, unitriangular=True)
    u, w = uw.split([V, K], -1)
    q_decayed = q * G.exp()
    G_end = G[..., -1:, :]
    k_to_end = k * (G_end - G).exp()                            # decay from each token to chunk end
    end_decay = G_end.squeeze(-2).exp()[..., None]              # [B, H, NT, K, 1]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outputs = []
    for n in range(NT):
        U = u[:, :, n] - w[:, :, n] @ S                         # values corrected by the state
        outputs.append(q_decayed[:, :, n] @ S + A_qk[:, :, n] @ U)
        S = end_decay[:, :, n] * S + k_to_end[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outputs, 2).permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o.to(out_dtype), (S if output_final_state else None)
