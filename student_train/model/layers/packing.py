"""Where each token of a forward sits: its document, its position, how many tokens came before.

Training packs documents back to back in one row; ``cu_seqlens`` (int32 ``[n_docs + 1]``, as in
FlashAttention and fla) marks their boundaries. KDA and the short convolutions restart at each
boundary, full attention gets a block-diagonal causal mask, RoPE positions restart at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kdpipe.schemas import ConfigError


@dataclass(frozen=True)
class SequenceLayout:
    """Token layout of one forward, built once by the model and read by every layer.

    Attributes:
        cu_seqlens: document boundaries of a packed row (batch 1), or ``None`` for ordinary rows.
        cu_seqlens_cpu: the same boundaries on the host (what per-document Python loops and
            kernel launch grids read, without waiting for the device).
        max_seqlen: length of the longest document (or of the row).
        position_ids: ``[B, T]`` positions, restarting at each document (RoPE reads them).
        past_length: tokens already in the cache before this forward.
    """

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    position_ids: torch.Tensor
    past_length: int = 0
    cu_seqlens_cpu: torch.Tensor | None = None

    @classmethod
    def build(cls, batch_size: int, seq_len: int, device: torch.device, *,
              cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              past_length: int = 0, cu_seqlens_cpu: torch.Tensor | None = None
              ) -> SequenceLayout:
        """Validate the caller's packing information and derive the rest.

        Documents come either from ``cu_seqlens`` or from ``position_ids`` that restart at 0
        inside a row (the convention of Hugging Face's flattening collator). A caller that has
        the boundaries on the host passes them as ``cu_seqlens_cpu`` too (or alone): on a GPU
        the layout is then built without reading anything back from the device.
        """
        if position_ids is not None and tuple(position_ids.shape) != (batch_size, seq_len):
            if position_ids.dim() == 1 and position_ids.numel() == seq_len:
                position_ids = position_ids[None].expand(batch_size, seq_len)
            else:
                raise ConfigError(f"position_ids has shape {tuple(position_ids.shape)}, "
                                  f"expected {(batch_size, seq_len)}")
        if cu_seqlens is None and cu_seqlens_cpu is None and position_ids is not None \
                and past_length == 0:
            starts = position_ids == 0
            if bool(starts[:, 1:].any()):
                if batch_size != 1:
                    raise ConfigError("position_ids restart inside rows of a batch of "
                                      f"{batch_size}: pack documents into a single row")
                if not bool(starts[0, 0]):
                    raise ConfigError("packed position_ids must start at 0")
                idx = torch.nonzero(starts[0]).flatten()
                cu_seqlens = torch.cat([idx, idx.new_tensor([seq_len])])
        if cu_seqlens is None and cu_seqlens_cpu is None:
            if position_ids is None:
                position_ids = torch.arange(past_length, past_length + seq_len, device=device)
                position_ids = position_ids[None].expand(batch_size, seq_len)
            return cls(None, seq_len, position_ids, past_length)

        if batch_size != 1:
            raise ConfigError("cu_seqlens needs one packed row (batch size 1), "
                              f"got batch size {batch_size}")
        if past_length:
            raise ConfigError("packed documents (cu_seqlens) cannot continue a cache")
        if cu_seqlens_cpu is None:      # read back once: waits for the work queued before
            cu_seqlens_cpu = torch.as_tensor(cu_seqlens).cpu()
        cu_seqlens_cpu = cu_seqlens_cpu.to(torch.int32).flatten()
        bounds = cu_seqlens_cpu.tolist()
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
            raise ConfigError(f"cu_seqlens must run from 0 to the row length {seq_len}, "
                              f"got {bounds}")
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if min(lengths) <= 0:
            raise ConfigError(f"cu_seqlens must be strictly increasing, got {bounds}")
        cu_seqlens = torch.as_tensor(cu_seqlens if cu_seqlens is not None else cu_seqlens_cpu)
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32).flatten()
        if position_ids is None:
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), cu_seqlens.diff().long(),
                                             output_size=seq_len)
            position_ids = (torch.arange(seq_len, device=device) - starts)[None]
        return cls(cu_seqlens, max(lengths), position_ids, 0, cu_seqlens_cpu)

    @cached_property
    def doc_bounds(self) -> list[int] | None:
        """``cu_seqlens`` on the host, read once per forward rather than once per layer."""
        return None if self.cu_seqlens_cpu is None else self.cu_seqlens_cpu.tolist()

    @cached_property
    def attention_mask(self) -> torch.Tensor | None:
        """Boolean ``[T, past + T]`` mask for SDPA (True = attend), or ``None`` where plain causal
        attention (``is_causal``) or no mask at all (a single new token) is exact."""
        T = self.position_ids.shape[1]
        device = self.position_ids.device
        if self.cu_seqlens is not None:
            lengths = self.cu_seqlens.diff().long()
            doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths,
                                          output_size=T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            return causal & (doc[:, None] == doc[None, :])
        if self.past_length == 0 or T == 1:
            return None
        rows = torch.arange(T, device=device)[:, None] + self.past_length
        return torch.arange(self.past_length + T, device=device)[None, :] <= rows
