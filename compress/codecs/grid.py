"""Values on a fixed grid, entropy-coded: the value codec that measurement favours.

Two grids:

* ``sqrt``: ``q = round(sqrt(p) / step)``. The square root is the variance-stabilising
  transform of a categorical distribution: a uniform error ``e`` in ``sqrt(p)`` costs
  ``KL ~ 2 e**2`` per token *whatever p is*, so one step size spends bits where the
  KL is and none on precision of tokens that carry no mass. Expected top-k KL is about
  ``k * step**2 / (6 * S)`` with S the top-k mass (renormalizing scales the errors).
  Each bin decodes to its mean probability, ``step**2 * (q**2 + 1/12)`` (the
  conditional mean for a uniform square root), so even q = 0 decodes to a positive
  probability and no log-prob is ever -inf. Decoded values stay within 0.55 step of the
  exact ones in sqrt(p).
* ``log``: ``q = round(-log p / step)``, a uniform error in log-prob (KL ~ step**2 / 24,
  ``|delta log p| <= step / 2``).
  Costs more bits at equal KL than ``sqrt`` but bounds ``|delta log p|`` for every token;
  with ``delta`` in rank order the differences are small.

Grid indices are coded as symbol streams through zstd, per document. With
``delta`` each row stores differences to the previous index (zig-zag signed), which pays
off in rank order where rows are monotone. With ``tail_mass`` the missing mass
``1 - sum(p)`` of every row is stored on the same grid, for the full-distribution KL
and the trainer's tail bucket.

Decoding is a table lookup (sqrt: a float64 table made on the CPU) or one float64
multiply (log), so CPU and GPU decode to bit-identical float32 values.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from kdpipe.schemas import CodecError, ConfigError

from . import entropy
from .base import VALUES, ValuesCodec, register, tail_from_values

TRANSFORMS = ("sqrt", "log")
LOG_FLOOR_NATS = 1000.0  # -inf and smaller log-probs are stored as this
ORDINAL_TABLE_MAX = 1 << 20  # log grids finer than 1000 nats / 2**20 sort by value instead
FLOAT32_MAX_INDEX = 1 << 12  # sqrt grids with at most this many bins quantize in float32


def top_index(transform: str, step: float) -> int:
    """The largest grid index: p = 1 on the sqrt grid, the floor on the log grid. Indices
    are clamped to it, so rounding can never step past the decoder's table."""
    return int(np.rint((1.0 if transform == "sqrt" else LOG_FLOOR_NATS) / step))


def sqrt_levels(step: float) -> np.ndarray:
    """Decoded probability of every sqrt-grid index 0..top_index (float64)."""
    q = np.arange(top_index("sqrt", step) + 1, dtype=np.float64)
    return np.minimum(step * step * (q * q + 1.0 / 12.0), 1.0)


def quantize(logprobs: np.ndarray, transform: str, step: float) -> np.ndarray:
    """Log-probs (any shape) -> int64 grid indices (float64 arithmetic)."""
    lp = np.minimum(np.asarray(logprobs, dtype=np.float64), 0.0)
    if transform == "sqrt":
        q = np.rint(np.exp(0.5 * lp) * (1.0 / step))
    else:
        q = np.rint(np.minimum(-lp, LOG_FLOOR_NATS) * (1.0 / step))
    return np.minimum(q, top_index(transform, step)).astype(np.int64)


def quantize_mass(mass: np.ndarray, transform: str, step: float) -> np.ndarray:
    """Probability masses in [0, 1] -> int64 grid indices."""
    mass = np.clip(mass, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return quantize(np.log(mass), transform, step)


def zigzag(d: np.ndarray) -> np.ndarray:
    return np.where(d >= 0, 2 * d, -2 * d - 1)


def unzigzag(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z & 1 == 0, z >> 1, -((z + 1) >> 1))


@register(VALUES, "grid")
class GridValues(ValuesCodec):
    """Params: ``transform`` (sqrt|log), ``step`` (grid step in the transformed unit),
    ``delta`` (default false), ``tail_mass`` (default true), ``level`` (zstd, default 1,
    as for the ``gaps`` ids)."""

    entropy_coded = True

    def __init__(self, params: dict[str, Any], *, k: int) -> None:
        super().__init__(params, k=k)
        known = {"transform", "step", "delta", "tail_mass", "level"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"values grid: unknown parameters {unknown}")
        self.transform = params.get("transform")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"values grid: transform must be one of {TRANSFORMS}, "
                              f"got {self.transform!r}")
        step = params.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or \
                not 1e-6 <= step <= 1.0:
            raise ConfigError(f"values grid: step must be a number in [1e-6, 1], got {step!r}")
        self.step = float(step)
        self.delta = bool(params.get("delta", False))
        self.stores_tail = bool(params.get("tail_mass", True))
        self.level = entropy.check_level(params.get("level", 1), "values grid")
        self.tag = entropy.params_tag("values.grid", {
            "transform": self.transform, "step": self.step, "delta": self.delta,
            "tail": self.stores_tail})
        self.n_streams = 2 if self.stores_tail else 1
        top = top_index(self.transform, self.step)
        self.index_bound = top + 1
        if self.transform == "sqrt":
            levels = sqrt_levels(self.step)
            self._lp_table = np.log(levels).astype(np.float32)
            self._mass_table = levels.astype(np.float32)
            # ordinal = top index - q: decoded log-probs decrease as q falls
            ordinal_levels = self._lp_table[::-1].copy()
        else:   # ordinal = q, up to the floor; tiny steps make too big a table
            ordinal_levels = (np.arange(top + 1) * -self.step).astype(np.float32) \
                if top < ORDINAL_TABLE_MAX else None
        if ordinal_levels is not None and bool(np.all(np.diff(ordinal_levels) < 0)):
            self.ordinal_levels = torch.from_numpy(ordinal_levels)

    # -- encode -------------------------------------------------------------------------

    def quantize(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """[N, k] log-probs -> (int32 grid indices, every row's missing mass or None)."""
        values = np.asarray(values, dtype=np.float32)
        if np.isnan(values).any():
            raise CodecError("values grid: log-probs contain NaN")
        if self.transform == "sqrt" and self.index_bound <= FLOAT32_MAX_INDEX:
            # float32, in place: this runs on every captured position, and numpy's float32
            # exp is ~10x its float64 one. With at most 4096 bins (steps >= 2.4e-4; the
            # presets have 527 and 295) exp's ulp moves only values within ~5e-4 steps of
            # a bin edge into the neighbouring bin, still within 0.55 step of the exact
            # sqrt(p). The missing mass sums float32 probabilities in float64: at most
            # 2.2e-7 absolute error on the embedded teacher's rows, which puts 0.06% of
            # `default`'s tail indices (and 2e-6 of its value indices) one bin off the
            # float64 result. Finer grids quantize in float64.
            root = np.minimum(values, np.float32(0.0))
            root *= np.float32(0.5)
            np.exp(root, out=root)
            mass = 1.0 - np.einsum("ij,ij->i", root, root, dtype=np.float64) \
                if self.stores_tail else None
            root *= np.float32(1.0 / self.step)
            np.minimum(root, np.float32(self.index_bound - 1), out=root)
            return np.rint(root, out=root).astype(np.int32), mass
        lp = np.minimum(values, 0.0, dtype=np.float64)
        mass = 1.0 - np.exp(lp).sum(axis=1) if self.stores_tail else None
        return quantize(lp, self.transform, self.step).astype(np.int32), mass

    def encode_indices(self, q: np.ndarray, mass: np.ndarray | None) -> bytes:
        if self.delta:
            q = zigzag(np.diff(q, axis=1, prepend=0))
        streams = [entropy.encode_symbols(q, self.level)]
        if mass is not None:
            streams.append(entropy.encode_symbols(
                quantize_mass(mass, self.transform, self.step), self.level))
        return entropy.pack_container(self.tag, q.shape[0], self.k, streams)

    def encode(self, values: np.ndarray) -> bytes:
        return self.encode_indices(*self.quantize(values))

    # -- decode -------------------------------------------------------------------------

    @staticmethod
    def _indices(docs: list[list[bytes]], counts: list[int], stream: int,
                 device: torch.device, what: str) -> torch.Tensor:
        return entropy.decode_symbols([d[stream] for d in docs], counts, device, what)[0]

    def _lookup(self, q: torch.Tensor, table: np.ndarray, what: str) -> torch.Tensor:
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= table.size):
            raise CodecError(f"{what}: grid index outside [0, {table.size}) (corrupt data)")
        return torch.from_numpy(table).to(q.device).index_select(0, q.reshape(-1)) \
            .view(q.shape)

    def _to_logprobs(self, q: torch.Tensor, what: str) -> torch.Tensor:
        if self.transform == "sqrt":
            return self._lookup(q, self._lp_table, what)
        if q.numel() and int(q.min()) < 0:
            raise CodecError(f"{what}: negative grid index (corrupt data)")
        return (q.double() * -self.step).float()

    def _to_mass(self, q: torch.Tensor, what: str) -> torch.Tensor:
        if self.transform == "sqrt":
            return self._lookup(q, self._mass_table, what)
        return self._to_logprobs(q, what).double().exp().float()

    def _grid_rows(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device
                   ) -> tuple[list[list[bytes]], torch.Tensor]:
        """(every document's streams, the [N, k] grid indices, deltas summed)."""
        docs = entropy.unpack_documents(blobs, rows, self.tag, self.k, self.n_streams,
                                        "values grid")
        q = self._indices(docs, [n * self.k for n in rows], 0, device, "values grid")
        q = q.view(-1, self.k)
        if self.delta:
            q = torch.cumsum(unzigzag(q), dim=1, dtype=torch.int32)
        return docs, q

    def _stored_mass(self, docs: list[list[bytes]], rows: Sequence[int],
                     device: torch.device) -> torch.Tensor:
        what = "values grid tail"
        return self._to_mass(self._indices(docs, list(rows), 1, device, what), what)

    def _decode(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
                with_tail: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        docs, q = self._grid_rows(blobs, rows, device)
        values = self._to_logprobs(q, "values grid")
        if not with_tail:
            return values, None
        if not self.stores_tail:
            return values, tail_from_values(values)
        return values, self._stored_mass(docs, rows, device)

    def decode_with_tail(self, blobs: Sequence[bytes], rows: Sequence[int],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode(blobs, rows, device, with_tail=True)

    def decode_ordinals(self, blobs: Sequence[bytes], rows: Sequence[int], device: torch.device,
                        with_tail: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See ``ValuesCodec.ordinal_levels``; only called when that table exists."""
        docs, q = self._grid_rows(blobs, rows, device)
        top = self.ordinal_levels.numel() - 1
        if q.numel() and (int(q.min()) < 0 or int(q.max()) > top):
            raise CodecError(f"values grid: grid index outside [0, {top}] (corrupt data)")
        ordinals = q.neg_().add_(top) if self.transform == "sqrt" else q
        if not with_tail:
            return ordinals, None
        if not self.stores_tail:
            return ordinals, tail_from_values(self.ordinal_levels.to(device)[ordinals])
        return ordinals, self._stored_mass(docs, rows, device)

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        return self._decode(blobs, rows, device, with_tail=False)[0]
