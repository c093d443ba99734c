"""RMS norms: the teacher's (Llama/Arcee) and KDA's sigmoid-gated output norm."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in float32 and cast back exactly as Llama does, so a
    student that copies the teacher's norms reproduces its numbers."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedRMSNorm(nn.Module):
    """KDA's ``o_norm``: per-head RMSNorm times ``sigmoid(gate)`` (fla's ``FusedRMSNormGated``
    with ``activation="sigmoid"``; same parameter, ``weight`` of size head_dim)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (x * torch.sigmoid(gate.float())).to(dtype)
