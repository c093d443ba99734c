"""Kimi Delta Attention layer with fla's parameter names, shapes and initialization.

Reference: Kimi Linear: An Expressive, Efficient Attention Architecture (arXiv 2510.26692).
Parameters, as ``fla.layers.KimiDeltaAttention`` with ``expand_v=1``: ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` (``hidden x H*D``), depthwise causal convs ``q_conv1d``/``k_conv1d``/
``v_conv1d`` (SiLU), the low-rank decay input ``f_proj`` (``hidden -> D -> H*D``), the beta logits
``b_proj`` (``hidden -> H``), the output gate ``g_proj`` (``hidden -> D -> H*D``, with bias),
``A_log`` (``[H]``), ``dt_bias`` (``[H*D]``) and the gated output norm ``o_norm`` (``[D]``). At
hidden 2560 with 20 heads of 128 that is 27.6M parameters.

The layer holds no kernel code: it projects, then calls ``kda`` and ``short_conv`` from
``ops.kda_fla`` (CUDA tensors with fla installed) or ``ops.kda_torch`` (everything else).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from kdpipe.schemas import ConfigError

from ..ops import kda_fla, kda_torch
from .norm import GatedRMSNorm
from .packing import SequenceLayout

# Up to this many tokens without autograd (decoding, short prompts) the token loop is used.
RECURRENT_MAX_TOKENS = 16


class ShortConvolution(nn.Conv1d):
    """Weights of a depthwise causal convolution: ``weight`` ``[D, 1, W]`` (fla's layout).

    Applied causally with a state of the last W inputs (see ``ops.kda_torch.short_conv``), never
    through ``nn.Conv1d.forward``, whose symmetric padding would look ahead.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False) -> None:
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size,
                         padding=kernel_size - 1, bias=bias)

    def forward(self, x: torch.Tensor, ops: ModuleType, *, cache: torch.Tensor | None = None,
                output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ops.short_conv(x, self.weight, self.bias, cache=cache,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


class KimiDeltaAttention(nn.Module):
    """KDA token mixer.

    Args:
        hidden_size: Model width.
        num_heads: Number of heads H (q, k and v share it).
        head_dim: Key and value head size D.
        conv_size: Width W of the short convolutions.
        norm_eps: Epsilon of ``o_norm``.
        backend: ``auto``, ``torch`` or ``fla`` (see ``KDAHybridConfig.kda_backend``).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, conv_size: int = 4,
                 norm_eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.backend = backend
        dim = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, dim, bias=False)
        self.q_conv1d = ShortConvolution(dim, conv_size)
        self.k_conv1d = ShortConvolution(dim, conv_size)
        self.v_conv1d = ShortConvolution(dim, conv_size)
        self.f_proj = nn.Sequential(nn.Linear(hidden_size, head_dim, bias=False),
                                    nn.Linear(head_dim, dim, bias=False))
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(dim, dtype=torch.float32))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, head_dim, bias=False),
                                    nn.Linear(head_dim, dim, bias=True))
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(dim, hidden_size, bias=False)
        with torch.no_grad():
            A_log, dt_bias = self.initial_decay_parameters()
            self.A_log.copy_(A_log)
            self.dt_bias.copy_(dt_bias)

    def initial_decay_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fla's initialization: ``A = U(1, 16)`` per head, and ``dt_bias = softplus^-1(dt)`` with
        ``dt`` log-uniform in ``[1e-3, 0.1]`` per channel, so the initial decay rates spread over
        two orders of magnitude."""
        device = self.A_log.device
        A = torch.empty(self.A_log.shape, dtype=torch.float32, device=device).uniform_(1, 16)
        u = torch.rand(self.dt_bias.shape, dtype=torch.float32, device=device)
        dt = torch.exp(u * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        return A.log(), dt + torch.log(-torch.expm1(-dt))

    def _ops(self, x: torch.Tensor) -> ModuleType:
        if self.backend == "torch":
            return kda_torch
        if self.backend == "fla":
            if not x.is_cuda:
                raise ConfigError("kda_backend='fla' needs CUDA tensors; "
                                  "use 'auto' or 'torch' on CPU")
            if not kda_fla.FLA_INSTALLED:
                raise ConfigError("kda_backend='fla' needs the flash-linear-attention packages "
                                  "(pip install fla-core flash-linear-attention)")
            return kda_fla
        return kda_fla if x.is_cuda and kda_fla.FLA_INSTALLED else kda_torch

    def forward(self, x: torch.Tensor, layout: SequenceLayout, *, cache=None) -> torch.Tensor:
        """``x``: ``[B, T, hidden]``. ``cache`` (a ``KDAStateLayer``) supplies the conv and
        recurrent states to start from and receives the new ones."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        ops = self._ops(x)
        cu = layout.cu_seqlens
        keep = cache is not None
        conv_q, conv_k, conv_v = (cache.conv_states if keep and cache.conv_states
                                  else (None, None, None))
        conv = {"output_final_state": keep, "cu_seqlens": cu}
        q, conv_q = self.q_conv1d(self.q_proj(x), ops, cache=conv_q, **conv)
        k, conv_k = self.k_conv1d(self.k_proj(x), ops, cache=conv_k, **conv)
        v, conv_v = self.v_conv1d(self.v_proj(x), ops, cache=conv_v, **conv)
        o, state = ops.kda(q.view(B, T, H, D), k.view(B, T, H, D), v.view(B, T, H, D),
                           self.f_proj(x).view(B, T, H, D), self.b_proj(x),
                           self.A_log, self.dt_bias,
                           initial_state=cache.recurrent_state if keep else None,
                           output_final_state=keep, cu_seqlens=cu,
                           recurrent=not torch.is_grad_enabled() and T <= RECURRENT_MAX_TOKENS)
        if keep:
            cache.update((conv_q, conv_k, conv_v), state)
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D))
