"""Regional compilation: each decoder layer compiled on its own, as torchtitan does.

A training step of the hybrid student is launch-bound between its matmuls: norms, gates,
casts and residual adds run as dozens of small kernels per layer. ``torch.compile`` of each
decoder layer fuses them; fla's KDA and convolution kernels and the attention kernel stay
opaque (``torch.compiler.disable`` in the model), so a layer compiles as a few graphs around
them. Layers of one type share their compiled code, so compile time does not grow with depth.
Modules are compiled in place: parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn



def wants_compile(choice: str, device: torch.device) -> bool:
    """``train.compile``: ``layers``, or ``auto`` on CUDA only (on a CPU the first steps'
    compile time outweighs what fusion saves, and CPU runs are the short ones)."""
    return choice == "layers" or (choice == "auto" and device.type == "cuda")


def compile_decoder_layers(student: nn.Module) -> int:
    """Compile every decoder layer of a ``KDAHybridForCausalLM`` in place; returns how many."""
    layers = student.model.layers
    # packed rows change the number of documents every step: after one recompile dynamo treats
    # those sizes as dynamic; layers of several types each keep their own entries
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile()
    return len(layers)
