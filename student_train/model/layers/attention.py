"""Full softmax attention as in the teacher: GQA, optional RoPE, causal within documents.

``full_rope`` layers are the teacher's attention unchanged; ``full_nope`` layers are the same
weights without positional encoding (the hybrid's global layers). KV heads stay grouped, as in
the teacher: nothing is expanded in the parameters or the cache.

Packed rows run on FlashAttention's varlen kernel (``torch.nn.attention.varlen``, where this
torch has it) for CUDA half-precision tensors, else on causal SDPA once per document, or, for
rows of very many documents, on SDPA with a dense block-diagonal causal mask (``[T, T]``
booleans: quadratic memory and work across documents).
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kdpipe.schemas import ConfigError

from .packing import SequenceLayout

# Rope types whose frequencies change with the sequence length at run time.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


class RotaryEmbedding(nn.Module):
    """cos/sin tables from the config's ``rope_parameters`` (default, linear, YaRN, llama3, ...),
    computed as Llama does so ``full_rope`` layers match the teacher."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type in _DYNAMIC_ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} (frequencies that change with the "
                              "sequence length) is not supported by full_rope layers")
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            dim = self.config.head_dim
            base = self.config.rope_parameters["rope_theta"]
            exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
            return 1.0 / (base ** exponents), 1.0
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(dtype),
                (emb.sin() * self.attention_scaling).to(dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``[B, H, T, D]`` queries and keys by ``[B, T, D]`` tables."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# Packed rows of up to this many documents without the varlen kernel attend per document;
# beyond, the per-call launches would cost more than the dense mask's wasted work.
PER_DOCUMENT_MAX_DOCS = 64


@cache
def _flash_varlen():
    """torch's FlashAttention varlen function, if this torch has one with causal windows and GQA."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa"} <= params.keys() else None


@torch.compiler.disable   # per-document loops and varlen kernels: run as they are
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout,
           scale: float) -> torch.Tensor:
    """Causal GQA attention of ``[B, Hq, T, D]`` queries over ``[B, Hkv, S, D]`` keys/values,
    never across documents. Returns ``[B, Hq, T, D]``."""
    gqa = q.shape[1] != k.shape[1]
    varlen = _flash_varlen()
    if (layout.cu_seqlens is not None and varlen is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        cu = layout.cu_seqlens
        out = varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                     layout.max_seqlen, layout.max_seqlen, scale=scale, window_size=(-1, 0),
                     enable_gqa=gqa)
        return out.transpose(0, 1)[None]
    bounds = layout.doc_bounds
    if bounds is not None and len(bounds) - 1 <= PER_DOCUMENT_MAX_DOCS:
        # one causal attention per document: FlashAttention-class kernels, and none of the
        # masked [T, T] work that a block-diagonal mask costs across documents
        return torch.cat([F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale,
            enable_gqa=gqa) for a, b in zip(bounds, bounds[1:])], dim=2)
    mask = layout.attention_mask
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)


class FullAttention(nn.Module):
    """The teacher's attention block: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with GQA."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 use_rope: bool, bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.use_rope = use_rope
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, layout: SequenceLayout, *,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: DynamicLayer | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)    # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)    # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rotary(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attend(q, k, v, layout, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
