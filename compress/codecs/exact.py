"""The lossless codec: int32 ids and float32 log-probs in rank order, hidden states as captured."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import (HIDDEN, IDS, VALUES, Capabilities, HiddenCodec, IdsCodec, ValuesCodec,
                   check_ids, fixed_width_concat, register, tensor_from_bytes)


@register(IDS, "int32")
class Int32Ids(IdsCodec):
    capabilities = Capabilities(lossless=True)

    def encode(self, ids: np.ndarray) -> bytes:
        return np.ascontiguousarray(ids, dtype="<i4").tobytes()

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        data = fixed_width_concat(blobs, rows, 4 * self.k, "ids int32")
        ids = tensor_from_bytes(data, torch.int32, device).view(-1, self.k).long()
        return check_ids(ids, self.vocab_size, "ids int32")


@register(VALUES, "float32")
class Float32Values(ValuesCodec):
    capabilities = Capabilities(lossless=True)

    def encode(self, values: np.ndarray) -> bytes:
        return np.ascontiguousarray(values, dtype="<f4").tobytes()

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        data = fixed_width_concat(blobs, rows, 4 * self.k, "values float32")
        return tensor_from_bytes(data, torch.float32, device).view(-1, self.k)


@register(HIDDEN, "native")
class NativeHidden(HiddenCodec):
    """Raw little-endian bytes of the teacher's dtype (bf16 stays bf16: lossless)."""

    capabilities = Capabilities(lossless=True)
    encodes_on_device = True

    def encode_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        x = x.detach().to("cpu", self.dtype, copy=True).contiguous()
        return x.view(torch.uint8).numpy().reshape(-1)

    def encode_tensor(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return x.detach().to(self.dtype).contiguous().view(torch.uint8).reshape(-1)

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
               layer: int | None = None) -> torch.Tensor:
        item = torch.empty(0, dtype=self.dtype).element_size()
        data = fixed_width_concat(blobs, rows, item * self.hidden_size, "hidden native")
        return tensor_from_bytes(data, self.dtype, device).view(-1, self.hidden_size).float()
