"""Generation cache of the hybrid: KV for full-attention layers, fixed-size states for KDA layers.

A KDA layer's cache is three short-conv windows (``[B, H*D, W]``, the last W inputs of q, k, v
projections, fla's layout) and the recurrent state (``[B, H, D, D]``, float32); it does not grow
with the sequence. Full-attention layers keep transformers' ``DynamicLayer`` (grouped KV heads).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class KDAStateLayer:
    """Cache entry of one KDA layer. A recurrent state cannot be rewound, so no cropping."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        self.conv_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.recurrent_state: torch.Tensor | None = None

    @property
    def is_initialized(self) -> bool:
        return self.recurrent_state is not None

    def update(self, conv_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               recurrent_state: torch.Tensor) -> None:
        self.conv_states, self.recurrent_state = tuple(conv_states), recurrent_state

    def _map(self, fn) -> None:
        if self.recurrent_state is not None:
            self.conv_states = tuple(fn(c) for c in self.conv_states)
            self.recurrent_state = fn(self.recurrent_state)

    def reset(self) -> None:
        self.conv_states, self.recurrent_state = None, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a KDA recurrent state cannot be rolled back; assisted decoding and "
                             "other cache cropping are not supported")

    def get_max_length(self) -> int:
        return -1


class KDAHybridCache(Cache):
    """One cache layer per decoder layer, by ``config.layer_types``; counts the tokens seen,
    since an all-KDA model has no KV tensor to measure."""

    def __init__(self, config) -> None:
        super().__init__(layers=[KDAStateLayer() if t == "kda" else DynamicLayer()
                                 for t in config.layer_types])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
