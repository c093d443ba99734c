"""Hidden-state codecs: bf16, fp8 (e4m3) and int8 with per-token scales, and low rank.

Every kind stores one fixed-length row per token, so a batch of documents decodes as
one [N, row_bytes] tensor in a few operations on any device.

* ``bf16``: 2 bytes per dimension; lossless when the teacher runs in bf16.
* ``fp8``: a bf16 scale per token (max |x| / 448) and the scaled values as e4m3, about
  1 byte per dimension. A float format keeps *relative* precision, so the few
  "massive activation" dimensions that set the scale do not wipe out the small ones.
* ``int8``: a bf16 scale per token (max |x| / 127) and symmetric int8 codes. Uniform
  levels: massive activations leave the ordinary dimensions only a few levels, which
  the cosine with those dimensions excluded shows.
* ``lowrank``: per layer, ``(x - mean) @ basis`` with an orthonormal [H, rank] basis
  fitted by PCA on a calibration sample (``fit_lowrank``); coefficients as fp8 (with a
  per-token scale) or bf16. The projection is a dataset artifact whose path and sha256
  are codec parameters, so data can only be decoded with the projection that encoded it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kdpipe.schemas import CodecError, ConfigError

from .base import (HIDDEN, Capabilities, HiddenCodec, fixed_width_concat, register,
                   tensor_from_bytes)

FP8_MAX = 448.0
INT8_MAX = 127.0
ArtifactLoader = Callable[[str], bytes]


def _rows_tensor(blobs: Sequence[bytes], rows: Sequence[int], row_bytes: int, what: str,
                 device: torch.device) -> torch.Tensor:
    data = fixed_width_concat(blobs, rows, row_bytes, what)
    return tensor_from_bytes(data, torch.uint8, device).view(-1, row_bytes)


def _scaled_encode(x: torch.Tensor, limit: float, to_codes: Callable) -> np.ndarray:
    """[T, H] -> rows of [bf16 scale | codes of x / scale], computed on ``x``'s device (a GPU
    encodes a capture's hidden states far faster than the host, and copies half the bytes)."""
    return _scaled_rows(x, limit, to_codes).cpu().numpy().reshape(-1)


def _scaled_rows(x: torch.Tensor, limit: float, to_codes: Callable) -> torch.Tensor:
    """``_scaled_encode`` as a 1-D uint8 tensor on ``x``'s device."""
    x = x.detach().float()
    scale = (x.abs().amax(dim=1, keepdim=True) / limit).to(torch.bfloat16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale.float()))
    codes = to_codes((x / safe).clamp(-limit, limit))
    rows = x.shape[0]   # explicit shapes: zero-token documents have no strides to view by
    row = torch.cat([scale.reshape(-1).view(torch.uint8).reshape(rows, 2),
                     codes.reshape(-1).view(torch.uint8).reshape(rows, x.shape[1])], dim=1)
    return row.reshape(-1)


def _scaled_decode(data: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
    scale = data[:, :2].contiguous().view(torch.bfloat16).float()
    return data[:, 2:].contiguous().view(code_dtype).float() * scale


def _check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise CodecError(f"{what}: decoded hidden states are not finite (corrupt data)")
    return x


class _NoParams(HiddenCodec):
    name = ""

    def __init__(self, params: dict[str, Any], *, hidden_size: int, dtype: torch.dtype,
                 artifacts: ArtifactLoader | None = None) -> None:
        super().__init__(params, hidden_size=hidden_size, dtype=dtype, artifacts=artifacts)
        if params:
            raise ConfigError(f"hidden {self.name}: takes no parameters, got {sorted(params)}")


@register(HIDDEN, "bf16")
class Bf16Hidden(_NoParams):
    name = "bf16"
    encodes_on_device = True

    def encode_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        return x.detach().to("cpu", torch.bfloat16, copy=True).contiguous().view(torch.uint8) \
            .numpy().reshape(-1)

    def encode_tensor(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return x.detach().to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1)

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
               layer: int | None = None) -> torch.Tensor:
        data = _rows_tensor(blobs, rows, 2 * self.hidden_size, "hidden bf16", device)
        return data.view(torch.bfloat16).float()


@register(HIDDEN, "fp8")
class Fp8Hidden(_NoParams):
    name = "fp8"
    encodes_on_device = True

    def encode_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        return self.encode_tensor(x, layer).cpu().numpy()

    def encode_tensor(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return _scaled_rows(x, FP8_MAX, lambda v: v.to(torch.float8_e4m3fn))

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
               layer: int | None = None) -> torch.Tensor:
        data = _rows_tensor(blobs, rows, 2 + self.hidden_size, "hidden fp8", device)
        return _check_finite(_scaled_decode(data, torch.float8_e4m3fn), "hidden fp8")


@register(HIDDEN, "int8")
class Int8Hidden(_NoParams):
    name = "int8"
    encodes_on_device = True

    def encode_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        return self.encode_tensor(x, layer).cpu().numpy()

    def encode_tensor(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return _scaled_rows(x, INT8_MAX, lambda v: torch.round(v).to(torch.int8))

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
               layer: int | None = None) -> torch.Tensor:
        data = _rows_tensor(blobs, rows, 2 + self.hidden_size, "hidden int8", device)
        return _check_finite(_scaled_decode(data, torch.int8), "hidden int8")


# -- low rank --------------------------------------------------------------------------------

def fit_lowrank(samples: dict[int, torch.Tensor], rank: int) -> bytes:
    """PCA per layer on calibration hidden states [T, H] -> the projection artifact bytes.

    The artifact is a safetensors file with ``mean.<layer>`` [H] and ``basis.<layer>``
    [H, rank] (orthonormal columns, leading principal directions first), float32.
    """
    from safetensors.torch import save

    tensors = {}
    for layer, x in samples.items():
        x = x.detach().to("cpu", torch.float64)
        if not 1 <= rank <= min(x.shape):
            raise ConfigError(f"lowrank: rank {rank} needs at least {rank} calibration tokens "
                              f"and dimensions (layer {layer} has {tuple(x.shape)})")
        mean = x.mean(dim=0)
        cov = (x - mean).T @ (x - mean)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        tensors[f"mean.{layer}"] = mean.float().contiguous()
        tensors[f"basis.{layer}"] = vecs[:, -rank:].flip(1).float().contiguous()
    return save(tensors)


@register(HIDDEN, "lowrank")
class LowRankHidden(HiddenCodec):
    """Params: ``rank``, ``coeff_dtype`` (fp8|bfloat16, default fp8), ``projection`` (artifact
    path in the dataset) and ``projection_sha256``."""

    capabilities = Capabilities(side_data="projection")
    COEFF_DTYPES = ("fp8", "bfloat16")

    def __init__(self, params: dict[str, Any], *, hidden_size: int, dtype: torch.dtype,
                 artifacts: ArtifactLoader | None = None) -> None:
        super().__init__(params, hidden_size=hidden_size, dtype=dtype, artifacts=artifacts)
        known = {"rank", "coeff_dtype", "projection", "projection_sha256"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"hidden lowrank: unknown parameters {unknown}")
        self.rank = params.get("rank")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= hidden_size:
            raise ConfigError(f"hidden lowrank: rank must be in [1, {hidden_size}], "
                              f"got {self.rank!r}")
        self.coeff_dtype = params.get("coeff_dtype", "fp8")
        if self.coeff_dtype not in self.COEFF_DTYPES:
            raise ConfigError(f"hidden lowrank: coeff_dtype must be one of {self.COEFF_DTYPES}")
        for key in ("projection", "projection_sha256"):
            if not isinstance(params.get(key), str):
                raise ConfigError(f"hidden lowrank: {key} is required (fit the projection "
                                  f"first: kdpipe compress does)")
        self.row_bytes = 2 + self.rank if self.coeff_dtype == "fp8" else 2 * self.rank
        self._tensors: dict[str, torch.Tensor] | None = None
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _projection(self, layer: int | None, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer is None:
            raise ConfigError("hidden lowrank: the layer index is required (projections are "
                              "per layer)")
        if self._tensors is None:
            if self.artifacts is None:
                raise ConfigError(f"hidden lowrank: needs the artifact {self.params['projection']}"
                                  f" of the dataset, but no artifact source was given")
            from safetensors.torch import load

            data = self.artifacts(self.params["projection"])
            if hashlib.sha256(data).hexdigest() != self.params["projection_sha256"]:
                raise CodecError(f"hidden lowrank: {self.params['projection']} does not match "
                                 f"its sha256 in the codec configuration")
            self._tensors = load(data)
        key = (layer, device)
        if key not in self._on_device:
            if f"basis.{layer}" not in self._tensors:
                raise CodecError(f"hidden lowrank: the projection has no layer {layer}")
            basis = self._tensors[f"basis.{layer}"]
            if tuple(basis.shape) != (self.hidden_size, self.rank):
                raise CodecError(f"hidden lowrank: layer {layer} basis has shape "
                                 f"{tuple(basis.shape)}, expected {(self.hidden_size, self.rank)}")
            self._on_device[key] = (self._tensors[f"mean.{layer}"].to(device), basis.to(device))
        return self._on_device[key]

    def encode_array(self, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
        mean, basis = self._projection(layer, torch.device("cpu"))
        z = (x.detach().to("cpu", torch.float32) - mean) @ basis
        if self.coeff_dtype == "fp8":
            return _scaled_encode(z, FP8_MAX, lambda v: v.to(torch.float8_e4m3fn))
        return z.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().reshape(-1)

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
               layer: int | None = None) -> torch.Tensor:
        mean, basis = self._projection(layer, device)
        data = _rows_tensor(blobs, rows, self.row_bytes, "hidden lowrank", device)
        z = _scaled_decode(data, torch.float8_e4m3fn) if self.coeff_dtype == "fp8" else \
            data.view(torch.bfloat16).float()
        return _check_finite(z @ basis.T + mean, "hidden lowrank")

