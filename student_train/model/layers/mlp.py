"""The teacher family's MLPs, with the teacher's parameter names so conversion copies them."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class ReLUSquared(nn.Module):
    """``relu(x)^2`` computed as ``r * r``, in the input's dtype.

    transformers' ``relu2`` calls ``torch.square``, which bf16 autocast runs as ``pow`` in
    float32: the MLP's widest activation ([tokens, intermediate]) is then copied to float32,
    saved for backward at twice the memory and cast back for ``down_proj``. ``r * r`` in bf16
    rounds the exact square once, as that cast does, so values and gradients are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        return r * r


def activation(name: str) -> nn.Module:
    return ReLUSquared() if name == "relu2" else ACT2FN[name]


class GatedMLP(nn.Module):
    """Llama: ``down(act(gate x) * up x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str,
                 bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UngatedMLP(nn.Module):
    """Arcee: ``down(act(up x))`` with ``act = relu^2``."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str,
                 bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))
