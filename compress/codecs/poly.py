"""Head + fitted tail + quantized residuals: DistillKit's row layout, fitted properly.

Every position's values (rank order, descending) become one fixed-length byte row::

    [exact_k head values as exact_dtype]
    [one coefficient per term as term_dtype]           (least-squares fit of the tail)
    [per residual bin: scale as scale_dtype, then num_elements x element_bits,
     MSB first, padded to a byte]                       (quantized tail - fit)

with q in [-(2^(b-1)), 2^(b-1) - 1] stored as q + 2^(b-1), 1-bit bins decoding as
(2q - 1) * scale, and optional delta encoding (first value, then differences; decode is
a cumulative sum). Residual elements beyond the bins are zero.

Two kinds share this layout and this encoder:

* ``distillkit`` decodes exactly as DistillKit's decoder does (its parameter names and
  defaults, its abscissa -- raw t = 0..n-1 or linspace(0, 1) -- and its arithmetic in
  the term and exact dtypes), so its rows are byte-compatible in both directions.
* ``poly`` is kdpipe's variant: the abscissa is normalized (powers of x = 2t - 1 on
  [-1, 1], sqrt(t) and exp(t) on [0, 1]) and decoding is float64 with a basis computed
  on the CPU and summed in a fixed order, so CPU and GPU give bit-identical values
  (with delta encoding, equal up to float64 rounding of the cumulative sum).

The encoder, for both: the fit is a float64 least-squares solve with unit-normalized
columns (DistillKit fits in float32 on raw powers of t, condition ~6.5e8, which
reconstructs its recommended preset with nats of error on real data). Coefficients are
rounded to ``term_dtype`` one at a time, refitting the remaining ones after each, so
the rounding of one is absorbed by the others. Residuals are fitted against the fit the
decoder will actually compute. Bin scales map the largest residual exactly onto the
largest level (DistillKit's max/2^(b-1) clips it); 1-bit bins use the mean |residual|,
the best sign-only reconstruction. With delta encoding the encoder runs closed-loop:
every stored difference is taken against the decoder's running reconstruction, and the
tail is fitted to the cumulative values, so rounding errors do not accumulate.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kdpipe.runtime import DTYPES
from kdpipe.schemas import CodecError, ConfigError

from .base import VALUES, ValuesCodec, fixed_width_concat, register, tensor_from_bytes
from .bitpack import MAX_BITS, pack_rows, row_bytes, unpack_rows

SPECIAL_TERMS = ("sqrt", "exp")


def _itemsize(name: str) -> int:
    return torch.empty(0, dtype=DTYPES[name]).element_size()


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` (and back to float64)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(DTYPES[dtype]) \
        .double().numpy()


def to_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """[N, m] float64 -> [N, m * itemsize] uint8 of ``dtype``, little-endian."""
    # flattened in numpy first: some torch versions give a [1, 1] array a zero stride
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(DTYPES[dtype])
    return t.view(torch.uint8).numpy() \
        .reshape(x.shape[0], x.shape[1] * _itemsize(dtype))


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int

    @property
    def packed_bytes(self) -> int:
        return row_bytes(self.num_elements, self.element_bits)


@dataclass(frozen=True)
class Layout:
    k: int
    exact_k: int
    exact_dtype: str
    terms: tuple[int | str, ...]
    term_dtype: str
    bins: tuple[ResidualBin, ...]
    delta: bool

    @property
    def n_tail(self) -> int:
        return self.k - self.exact_k

    @property
    def row_bytes(self) -> int:
        return (self.exact_k * _itemsize(self.exact_dtype)
                + len(self.terms) * _itemsize(self.term_dtype)
                + sum(_itemsize(b.scale_dtype) + b.packed_bytes for b in self.bins))


def _dtype(params: dict, key: str, default: str, where: str) -> str:
    name = params.get(key, default)
    if name not in DTYPES:
        raise ConfigError(f"{where}: {key} must be one of {sorted(DTYPES)}, got {name!r}")
    return name


def parse_layout(params: dict[str, Any], k: int, where: str, *, delta_default: bool) -> Layout:
    """Validate the shared layout parameters (DistillKit's names and rules)."""
    exact_k = params.get("exact_k")
    if not isinstance(exact_k, int) or not 0 <= exact_k <= k:
        raise ConfigError(f"{where}: exact_k must be an integer in [0, k={k}], got {exact_k!r}")
    terms = params.get("polynomial_terms") or []
    for t in terms:
        if not (isinstance(t, int) and not isinstance(t, bool) and t >= 0) and \
                t not in SPECIAL_TERMS:
            raise ConfigError(f"{where}: polynomial term {t!r} is neither a power >= 0 nor "
                              f"one of {SPECIAL_TERMS}")
    if len(set(terms)) != len(terms):
        raise ConfigError(f"{where}: polynomial_terms {terms} repeat a term")
    bins = []
    for i, b in enumerate(params.get("residual_bins") or []):
        if not isinstance(b, dict) or set(b) != {"scale_dtype", "element_bits", "num_elements"}:
            raise ConfigError(f"{where}: residual_bins[{i}] needs exactly scale_dtype, "
                              f"element_bits and num_elements, got {b!r}")
        bits, n = b["element_bits"], b["num_elements"]
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"{where}: residual_bins[{i}].element_bits must be in "
                              f"[1, {MAX_BITS}], got {bits!r}")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}: residual_bins[{i}].num_elements must be >= 1")
        bins.append(ResidualBin(_dtype(b, "scale_dtype", "", f"{where}: residual_bins[{i}]"),
                                bits, n))
    n_tail = k - exact_k
    if sum(b.num_elements for b in bins) > n_tail:
        raise ConfigError(f"{where}: residual bins cover more than the k - exact_k = "
                          f"{n_tail} tail values")
    if n_tail and not terms and not bins:
        raise ConfigError(f"{where}: exact_k={exact_k} < k={k} needs polynomial_terms or "
                          f"residual_bins for the tail")
    if not n_tail and terms:
        raise ConfigError(f"{where}: exact_k = k leaves no tail for polynomial_terms")
    return Layout(k=k, exact_k=exact_k, exact_dtype=_dtype(params, "exact_dtype", "float32", where),
                  terms=tuple(terms), term_dtype=_dtype(params, "term_dtype", "float32", where),
                  bins=tuple(bins), delta=bool(params.get("delta_encoding", delta_default)))


@dataclass
class RowParts:
    """A batch of rows split into their fields (tensors on the decode device)."""

    exact: torch.Tensor                  # [N, exact_k] exact_dtype
    coeffs: torch.Tensor                 # [N, terms] term_dtype
    bins: list[tuple[torch.Tensor, torch.Tensor]]  # ([N, 1] scale_dtype, [N, n] int64 codes)


def split_rows(layout: Layout, data: torch.Tensor) -> RowParts:
    """[N, row_bytes] uint8 -> the fields of every row."""
    pos = 0

    def take(nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        # a copy, not .contiguous(): a one-row slice is contiguous already but starts at
        # an offset that a view as a wider dtype refuses
        nonlocal pos
        part = data[:, pos:pos + nbytes]
        pos += nbytes
        if not nbytes:
            return torch.empty(data.shape[0], 0, dtype=dtype, device=data.device)
        return part.clone(memory_format=torch.contiguous_format).view(dtype)

    exact = take(layout.exact_k * _itemsize(layout.exact_dtype), DTYPES[layout.exact_dtype])
    coeffs = take(len(layout.terms) * _itemsize(layout.term_dtype), DTYPES[layout.term_dtype])
    bins = []
    for b in layout.bins:
        scale = take(_itemsize(b.scale_dtype), DTYPES[b.scale_dtype])
        bins.append((scale, unpack_rows(take(b.packed_bytes), b.num_elements, b.element_bits)))
    return RowParts(exact, coeffs, bins)


class _LayoutValues(ValuesCodec):
    """The encoder both kinds share; subclasses give the basis and the decoder arithmetic."""

    kind: str
    layout: Layout

    # -- what the decoder computes (subclasses) ---------------------------------------

    @abstractmethod
    def basis(self, device: torch.device) -> torch.Tensor:
        """[n_tail, terms] basis the decoder multiplies the coefficients with."""

    @abstractmethod
    def fit_values(self, coeffs: torch.Tensor) -> torch.Tensor:
        """[N, terms] coefficients (term_dtype) -> the decoder's [N, n_tail] fit."""

    @abstractmethod
    def assemble(self, parts: RowParts) -> torch.Tensor:
        """Fields -> [N, k] float32 log-probs."""

    # -- shared -------------------------------------------------------------------------

    def _prepare_fit(self) -> None:
        """Pseudo-inverses for the sequential rounded fit, one per suffix of the term order."""
        if not self.layout.terms:
            return
        design = self.basis(torch.device("cpu")).double().numpy()
        if not np.isfinite(design).all():
            raise ConfigError(f"values {self.kind}: the basis overflows term_dtype "
                              f"{self.layout.term_dtype} at n={self.layout.n_tail} points")
        if self.layout.delta:  # the fit must match cumulative values
            design = np.cumsum(design, axis=0)
        norms = np.linalg.norm(design, axis=0)
        norms[norms == 0] = 1.0
        self._design = design
        self._order = [int(i) for i in np.argsort(-norms, kind="stable")]
        self._pinvs = []
        for s in range(len(self._order)):
            cols = self._order[s:]
            self._pinvs.append(np.linalg.pinv(design[:, cols] / norms[cols]) / norms[cols, None])

    def _fit(self, y: np.ndarray) -> np.ndarray:
        """[N, n] targets -> [N, terms] coefficients, each representable in term_dtype."""
        coeffs = np.zeros((y.shape[0], len(self.layout.terms)))
        rest = y.copy()
        for s, i in enumerate(self._order):
            c = round_to(rest @ self._pinvs[s][0], self.layout.term_dtype)
            if not np.isfinite(c).all():
                raise CodecError(f"values {self.kind}: a fitted coefficient overflows "
                                 f"term_dtype {self.layout.term_dtype}")
            coeffs[:, i] = c
            rest -= c[:, None] * self._design[:, i]
        return coeffs

    def _bin_scale(self, r: np.ndarray, b: ResidualBin) -> np.ndarray:
        if b.element_bits == 1:
            scale = np.abs(r).mean(axis=1)
        else:
            scale = np.abs(r).max(axis=1) / ((1 << (b.element_bits - 1)) - 1)
        return round_to(scale, b.scale_dtype)

    @staticmethod
    def _quantize(r: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
        if bits == 1:
            return (r >= 0).astype(np.int64)
        half = 1 << (bits - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale > 0, np.rint(r / np.where(scale > 0, scale, 1.0)), 0)
        return np.clip(q, -half, half - 1).astype(np.int64) + half

    @staticmethod
    def _dequantize(q: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
        if bits == 1:
            return (2.0 * q - 1.0) * scale
        return (q - (1 << (bits - 1))) * scale

    def encode(self, values: np.ndarray) -> bytes:
        L = self.layout
        if self.params.get("error_diffusion"):
            raise ConfigError(f"values {self.kind}: encoding with error_diffusion is not "
                              f"supported (data written with it decodes normally)")
        v = np.asarray(values, dtype=np.float64)
        if not np.isfinite(v).all():
            raise CodecError(f"values {self.kind}: non-finite log-probs cannot be fitted; "
                             f"use a lossless or grid codec")
        n_rows, e = v.shape[0], L.exact_k
        if L.delta:  # closed loop: each stored difference is taken against the reconstruction
            head = np.zeros((n_rows, e))
            acc = np.zeros(n_rows)
            for j in range(e):
                head[:, j] = round_to(v[:, j] - acc, L.exact_dtype)
                acc += head[:, j]
            y = v[:, e:] - acc[:, None]
        else:
            head = round_to(v[:, :e], L.exact_dtype)
            y = v[:, e:]
        out = [to_bytes(head, L.exact_dtype)]
        fit = np.zeros_like(y)
        if L.terms:
            coeffs = self._fit(y)
            out.append(to_bytes(coeffs, L.term_dtype))
            fit = self.fit_values(torch.from_numpy(coeffs).to(DTYPES[L.term_dtype])) \
                .double().numpy()
        out += self._encode_bins(y, fit)
        return np.concatenate(out, axis=1).tobytes()

    def _encode_bins(self, y: np.ndarray, fit: np.ndarray) -> list[np.ndarray]:
        L = self.layout
        if not L.bins:
            return []
        scales, codes = [], []
        if not L.delta:
            r = y - fit
            pos = 0
            for b in L.bins:
                rb = r[:, pos:pos + b.num_elements]
                scales.append(self._bin_scale(rb, b))
                codes.append(self._quantize(rb, scales[-1][:, None], b.element_bits))
                pos += b.num_elements
        else:
            # scales from the open-loop residual differences, then one pass in order
            r_open = np.diff(y - np.cumsum(fit, axis=1), axis=1, prepend=0.0)
            pos = 0
            for b in L.bins:
                scales.append(self._bin_scale(r_open[:, pos:pos + b.num_elements], b))
                codes.append(np.zeros((y.shape[0], b.num_elements), np.int64))
                pos += b.num_elements
            acc = np.zeros(y.shape[0])
            col = 0
            for bi, b in enumerate(L.bins):
                for j in range(b.num_elements):
                    target = y[:, col] - acc - fit[:, col]
                    q = self._quantize(target[:, None], scales[bi][:, None], b.element_bits)
                    codes[bi][:, j] = q[:, 0]
                    acc += fit[:, col] + self._dequantize(q[:, 0], scales[bi], b.element_bits)
                    col += 1
        out = []
        for b, scale, q in zip(L.bins, scales, codes):
            out += [to_bytes(scale[:, None], b.scale_dtype), pack_rows(q, b.element_bits)]
        return out

    def decode(self, blobs: Sequence[bytes], rows: Sequence[int],
               device: torch.device) -> torch.Tensor:
        data = fixed_width_concat(blobs, rows, self.layout.row_bytes, f"values {self.kind}")
        data = tensor_from_bytes(data, torch.uint8, device).view(-1, self.layout.row_bytes)
        out = self.assemble(split_rows(self.layout, data))
        if torch.isnan(out).any():
            raise CodecError(f"values {self.kind}: decoded log-probs contain NaN "
                             f"(corrupt data or a mismatched configuration)")
        return out


@register(VALUES, "poly")
class PolyValues(_LayoutValues):
    """Params: exact_k, exact_dtype, polynomial_terms, term_dtype, residual_bins,
    delta_encoding (default false) -- DistillKit's meaning, on a normalized abscissa."""

    kind = "poly"

    def __init__(self, params: dict[str, Any], *, k: int) -> None:
        super().__init__(params, k=k)
        known = {"exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins",
                 "delta_encoding"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"values poly: unknown parameters {unknown}")
        self.layout = parse_layout(params, k, "values poly", delta_default=False)
        n = self.layout.n_tail
        t = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)
        cols = [np.sqrt(t) if term == "sqrt" else np.exp(t) if term == "exp"
                else (2.0 * t - 1.0) ** term for term in self.layout.terms]
        self._basis = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
        self._prepare_fit()

    def basis(self, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self._basis).to(device)

    def fit_values(self, coeffs: torch.Tensor) -> torch.Tensor:
        c = coeffs.double()
        basis = self.basis(c.device)
        fit = torch.zeros(c.shape[0], basis.shape[0], dtype=torch.float64, device=c.device)
        for i in range(basis.shape[1]):  # fixed order, multiply then add: same bits everywhere
            fit = fit + c[:, i:i + 1] * basis[:, i]
        return fit

    def assemble(self, parts: RowParts) -> torch.Tensor:
        tail = self.fit_values(parts.coeffs) if self.layout.terms else \
            torch.zeros(parts.exact.shape[0], self.layout.n_tail, dtype=torch.float64,
                        device=parts.exact.device)
        pos = 0
        for b, (scale, q) in zip(self.layout.bins, parts.bins):
            s = scale.double()
            r = (2.0 * q.double() - 1.0) * s if b.element_bits == 1 else \
                (q - (1 << (b.element_bits - 1))).double() * s
            tail[:, pos:pos + b.num_elements] = tail[:, pos:pos + b.num_elements] + r
            pos += b.num_elements
        out = torch.cat([parts.exact.double(), tail], dim=1)
        if self.layout.delta:
            out = torch.cumsum(out, dim=1)
        return out.float()


@register(VALUES, "distillkit")
class DistillKitValues(_LayoutValues):
    """DistillKit's ``DistributionQuantizationConfig`` minus ``d`` and ``k`` (those are the
    ids codec's bits and the codec's top_k): exact_k, exact_dtype, polynomial_terms,
    term_dtype, residual_bins, delta_encoding (default true, as in DistillKit),
    error_diffusion, normalize_t."""

    kind = "distillkit"

    def __init__(self, params: dict[str, Any], *, k: int) -> None:
        super().__init__(params, k=k)
        known = {"exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins",
                 "delta_encoding", "error_diffusion", "normalize_t"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"values distillkit: unknown parameters {unknown}")
        self.layout = parse_layout(params, k, "values distillkit", delta_default=True)
        self.normalize_t = bool(params.get("normalize_t", False))
        self._bases: dict[torch.device, torch.Tensor] = {}
        self._prepare_fit()

    def basis(self, device: torch.device) -> torch.Tensor:
        """DistillKit's abscissa and terms, computed in term_dtype on the decode device."""
        if device not in self._bases:
            n, dt = self.layout.n_tail, DTYPES[self.layout.term_dtype]
            pts = torch.linspace(0, 1, steps=n, dtype=dt, device=device) if self.normalize_t \
                else torch.arange(n, dtype=dt, device=device)
            cols = [torch.sqrt(pts) if t == "sqrt" else torch.exp(pts) if t == "exp"
                    else pts ** t for t in self.layout.terms]
            self._bases[device] = torch.stack(cols, dim=-1) if cols else \
                torch.zeros(n, 0, dtype=dt, device=device)
        return self._bases[device]

    def fit_values(self, coeffs: torch.Tensor) -> torch.Tensor:
        return torch.sum(self.basis(coeffs.device) * coeffs.unsqueeze(-2), dim=-1)

    def assemble(self, parts: RowParts) -> torch.Tensor:
        # DistillKit's dtype flow: results come out in exact_dtype, the tail is promoted with
        # the term dtype, and the cumulative sum of delta encoding runs in float32.
        L = self.layout
        out_dtype = DTYPES[L.exact_dtype]
        n_rows, device = parts.exact.shape[0], parts.exact.device
        residuals = []
        for b, (scale, q) in zip(L.bins, parts.bins):
            if b.element_bits == 1:
                residuals.append((q.to(torch.float32) * 2.0 - 1.0) * scale)
            else:
                residuals.append((q - (1 << (b.element_bits - 1))).to(torch.float32) * scale)
        if residuals:
            residual = torch.cat(residuals, dim=-1)
            residual = torch.nn.functional.pad(residual, (0, L.n_tail - residual.shape[-1]))
        else:
            residual = torch.zeros(n_rows, L.n_tail, dtype=out_dtype, device=device)
        if L.terms:
            approx = self.fit_values(parts.coeffs) + residual.to(out_dtype)
        else:
            approx = residual.to(out_dtype)
        out = torch.cat([parts.exact.to(out_dtype), approx], dim=-1)
        if L.delta:
            out = torch.cumsum(out.float(), dim=-1).to(out_dtype)
        return out.float()
