"""The KDA layer's ops on fla's Triton kernels (CUDA only).

Same contract as ``ops.kda_torch`` (``kda`` and ``short_conv``), so the layer swaps one module for
the other. fla is imported inside the functions: importing it without a GPU either exports
nothing or fails, and CPU runs never reach this module.

Both ops are opaque to ``torch.compile`` (``torch.compiler.disable``): fla's Triton kernels,
with their own autotuning and autograd, run as they are, and a compiled decoder layer fuses
the elementwise work around them.
"""

from __future__ import annotations

import importlib.util

import torch

# Whether the ``fla`` package can be imported, checked once without importing it (a plain
# value, so a compiled layer that picks its ops does not trace an import lookup).
FLA_INSTALLED = importlib.util.find_spec("fla") is not None


@torch.compiler.disable
def kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        A_log: torch.Tensor, dt_bias: torch.Tensor, *, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
        recurrent: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_kda`` (training, prefill) or ``fused_recurrent_kda`` (decoding, forward only).

    The kernels apply the q/k L2 norm, the gate ``-exp(A_log) * softplus(g + dt_bias)`` and the
    beta sigmoid themselves, on the raw projections. States are float32 ``[N, H, K, V]``.
    """
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    op = fused_recurrent_kda if recurrent else chunk_kda
    if initial_state is not None:
        initial_state = initial_state.float()
    return op(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias,
              initial_state=initial_state, output_final_state=output_final_state,
              use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              use_beta_sigmoid_in_kernel=True, cu_seqlens=cu_seqlens)


@torch.compiler.disable
def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               cache: torch.Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's causal conv1d + SiLU; one-token decoding steps use its in-place update kernel."""
    from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update

    weight = weight.squeeze(1)
    n_seqs = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if cache is not None and not torch.is_grad_enabled() and x.shape[0] * x.shape[1] == n_seqs:
        y, cache = causal_conv1d_update(x=x, cache=cache, weight=weight, bias=bias,
                                        activation="silu")
        return y, (cache if output_final_state else None)
    return causal_conv1d(x=x, weight=weight, bias=bias, initial_state=cache,
                         output_final_state=output_final_state, activation="silu",
                         backend="triton", cu_seqlens=cu_seqlens)
