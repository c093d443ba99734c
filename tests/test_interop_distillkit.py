"""DistillKit's offline format, checked against an independent implementation of its layout.

The writer and reader here follow DistillKit's documented layout with plain Python bit
strings and float64 arithmetic (nothing from ``compress``): per position,
``[exact_k values][coefficients][per bin: scale, codes MSB first, byte-padded]``, ids at
ceil(log2 d) bits MSB first, n rows for n + 1 input ids.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from kdpipe.compress import Dataset
from kdpipe.compress.cli import export, import_
from kdpipe.schemas import CodecError, ConfigError, DatasetError

from test_codec_facade import make_documents, topk_rows, write_dataset

VOCAB = 5000


# -- an independent implementation of the layout ------------------------------------------------

def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint32) << 16).view(np.float32).astype(np.float64)


def store(x: float, dtype: str) -> tuple[bytes, float]:
    """A value's little-endian bytes in ``dtype`` and the value they hold."""
    if dtype == "bfloat16":
        b = to_bf16_bits(np.array([x]))
        return b.tobytes(), float(from_bf16_bits(b)[0])
    fmt = {"float16": "<e", "float32": "<f", "float64": "<d"}[dtype]
    raw = struct.pack(fmt, x)
    return raw, struct.unpack(fmt, raw)[0]


def read(raw: bytes, pos: int, dtype: str) -> tuple[float, int]:
    if dtype == "bfloat16":
        return float(from_bf16_bits(np.frombuffer(raw[pos:pos + 2], np.uint16))[0]), pos + 2
    fmt = {"float16": "<e", "float32": "<f", "float64": "<d"}[dtype]
    return struct.unpack_from(fmt, raw, pos)[0], pos + struct.calcsize(fmt)


def abscissa(n: int, terms: list, normalize: bool) -> np.ndarray:
    t = np.linspace(0, 1, n) if normalize else np.arange(n, dtype=np.float64)
    return np.stack([np.sqrt(t) if x == "sqrt" else np.exp(t) if x == "exp" else t ** x
                     for x in terms], 1)


def bits_to_bytes(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def write_row(values: np.ndarray, cfg: dict) -> tuple[bytes, list[float]]:
    """One position's value bytes and the log-probs a faithful decoder must return."""
    v = np.asarray(values, np.float64)
    if cfg["delta_encoding"]:
        v = np.concatenate([v[:1], np.diff(v)])
    out, decoded = b"", []
    for x in v[:cfg["exact_k"]]:
        raw, held = store(x, cfg["exact_dtype"])
        out += raw
        decoded.append(held)
    tail = v[cfg["exact_k"]:]
    basis = abscissa(len(tail), cfg["polynomial_terms"], cfg.get("normalize_t", False))
    coeffs = np.linalg.lstsq(basis, tail, rcond=None)[0]
    held_c = []
    for c in coeffs:
        raw, held = store(float(c), cfg["term_dtype"])
        out += raw
        held_c.append(held)
    fit = basis @ np.array(held_c)
    resid = np.zeros(len(tail))
    pos = 0
    for b in cfg["residual_bins"]:
        r = tail[pos:pos + b["num_elements"]] - fit[pos:pos + b["num_elements"]]
        bits = b["element_bits"]
        if bits == 1:   # a sign: q = 1 decodes to +scale, q = 0 to -scale
            raw, scale = store(float(np.abs(r).mean()), b["scale_dtype"])
            codes = [int(x >= 0) for x in r]
            resid[pos:pos + len(r)] = [(2 * q - 1) * scale for q in codes]
        else:           # q + 2^(b-1) with q = round(r / scale), scale = max|r| / 2^(b-1)
            raw, scale = store(float(np.abs(r).max()) / 2 ** (bits - 1), b["scale_dtype"])
            codes = [min(max(round(x / scale), -2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                     + 2 ** (bits - 1) for x in r] if scale else [2 ** (bits - 1)] * len(r)
            resid[pos:pos + len(r)] = [(q - 2 ** (bits - 1)) * scale for q in codes]
        out += raw + bits_to_bytes("".join(format(q, f"0{bits}b") for q in codes))
        pos += len(r)
    # DistillKit's decoder casts the dequantized residuals to exact_dtype before adding them
    decoded += list(fit + [store(float(x), cfg["exact_dtype"])[1] for x in resid])
    if cfg["delta_encoding"]:
        decoded = list(np.cumsum(decoded))
    return out, decoded


def write_ids(ids: np.ndarray, d: int) -> bytes:
    width = math.ceil(math.log2(d))
    return bits_to_bytes("".join(format(int(i), f"0{width}b") for i in ids))


def read_ids(raw: bytes, k: int, d: int) -> list[int]:
    width = math.ceil(math.log2(d))
    bits = "".join(format(b, "08b") for b in raw)
    return [int(bits[i * width:(i + 1) * width], 2) for i in range(k)]


def read_row(raw: bytes, cfg: dict) -> list[float]:
    pos, vals = 0, []
    for _ in range(cfg["exact_k"]):
        x, pos = read(raw, pos, cfg["exact_dtype"])
        vals.append(x)
    coeffs = []
    for _ in cfg["polynomial_terms"]:
        c, pos = read(raw, pos, cfg["term_dtype"])
        coeffs.append(c)
    n = cfg["k"] - cfg["exact_k"]
    tail = list(abscissa(n, cfg["polynomial_terms"], cfg.get("normalize_t", False))
                @ np.array(coeffs)) if coeffs else [0.0] * n
    col = 0
    for b in cfg["residual_bins"]:
        scale, pos = read(raw, pos, b["scale_dtype"])
        nbytes = (b["element_bits"] * b["num_elements"] + 7) // 8
        bits = "".join(format(x, "08b") for x in raw[pos:pos + nbytes])
        pos += nbytes
        w = b["element_bits"]
        for i in range(b["num_elements"]):
            q = int(bits[i * w:(i + 1) * w], 2)
            tail[col] += (2 * q - 1) * scale if w == 1 else (q - 2 ** (w - 1)) * scale
            col += 1
    assert pos == len(raw)
    out = vals + tail
    return list(np.cumsum(out)) if cfg["delta_encoding"] else out


CONFIGS = {
    "recommended": dict(d=VOCAB, k=32, exact_k=8, exact_dtype="bfloat16",
                        polynomial_terms=[0, 1, 2, 3, 4, "sqrt"], term_dtype="float32",
                        residual_bins=[], delta_encoding=False, error_diffusion=False),
    "bins-delta": dict(d=VOCAB, k=32, exact_k=2, exact_dtype="float32",
                       polynomial_terms=[0, 1, "sqrt"], term_dtype="float32",
                       residual_bins=[{"scale_dtype": "float16", "element_bits": 5,
                                       "num_elements": 20},
                                      {"scale_dtype": "float32", "element_bits": 1,
                                       "num_elements": 6}],
                       delta_encoding=True, error_diffusion=False),
    "normalized": dict(d=VOCAB + 7000, k=24, exact_k=1, exact_dtype="float16",
                       polynomial_terms=[0, 1, 2], term_dtype="float64",
                       residual_bins=[{"scale_dtype": "float64", "element_bits": 13,
                                       "num_elements": 23}],
                       delta_encoding=False, error_diffusion=True, normalize_t=True),
}


def write_distillkit(path, cfg: dict, docs: list[tuple[np.ndarray, np.ndarray]]) -> list:
    """Write a DistillKit dataset; returns each document's expected (ids, log-probs)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "compression_config.yaml").write_text(yaml.safe_dump(cfg))
    records, expected = [], []
    for ids, lps in docs:
        rows = [write_row(v, cfg) for v in lps[:, :cfg["k"]]]
        records.append({"input_ids": list(range(100, 100 + ids.shape[0] + 1)),
                        "compressed_logprobs": [list(r[0]) for r in rows],
                        "bytepacked_indices": [list(write_ids(i[:cfg["k"]], cfg["d"]))
                                               for i in ids]})
        expected.append((ids[:, :cfg["k"]], np.array([r[1] for r in rows])))
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    half = len(records) // 2
    pq.write_table(pa.Table.from_pylist(records[:half], schema=schema), path / "data_0.parquet")
    pq.write_table(pa.Table.from_pylist(records[half:], schema=schema), path / "data_1.parquet")
    return expected


# -- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_decodes_an_independently_written_dataset(tmp_path, name):
    cfg = CONFIGS[name]
    docs = [topk_rows(n, 32, seed=20 + n) for n in (5, 1, 9, 3)]
    expected = write_distillkit(tmp_path / "dk", cfg, docs)
    result = CliRunner().invoke(import_, ["--format", "distillkit", str(tmp_path / "dk"),
                                          str(tmp_path / "kd")])
    assert result.exit_code == 0, result.output
    ds = Dataset(str(tmp_path / "kd"))
    out = list(ds.iter_documents())
    assert len(out) == len(expected)
    for doc, (ids, lps) in zip(out, expected):
        n = ids.shape[0]
        assert doc.num_tokens == n + 1 and doc.teacher_mask.tolist() == [True] * n + [False]
        np.testing.assert_array_equal(doc.input_ids, np.arange(100, 101 + n))
        np.testing.assert_array_equal(doc.topk_ids.numpy(), ids)
        # DistillKit decodes in float32 (bf16/fp16 where its dtypes say so)
        np.testing.assert_allclose(doc.topk_logprobs.numpy(), lps, rtol=1e-5, atol=2e-4)


def test_import_refuses_malformed_data(tmp_path):
    cfg = CONFIGS["recommended"]
    docs = [topk_rows(4, 32, seed=30)]
    write_distillkit(tmp_path / "dk", cfg, docs)
    runner = CliRunner()

    def run(src):
        return runner.invoke(import_, ["--format", "distillkit", str(src),
                                       str(tmp_path / f"out{run.n}")])
    run.n = 0

    table = pq.read_table(tmp_path / "dk" / "data_1.parquet").to_pylist()
    table[0]["compressed_logprobs"][1] = table[0]["compressed_logprobs"][1][:-1]
    bad = tmp_path / "short"
    write_distillkit(bad, cfg, [])
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(
        tmp_path / "dk" / "data_1.parquet")), bad / "data_0.parquet")
    (bad / "data_1.parquet").unlink()
    result = run(bad)
    assert isinstance(result.exception, DatasetError) and "bytes" in str(result.exception)

    wide = tmp_path / "wide"   # 13 bits hold ids up to 8191, but d = 5000
    ids, lps = docs[0]
    ids = ids.copy()
    ids[0, 0] = 7000
    write_distillkit(wide, {**cfg, "d": 8000}, [(ids, lps)])
    (wide / "compression_config.yaml").write_text(yaml.safe_dump(cfg))
    run.n = 1
    result = run(wide)
    assert isinstance(result.exception, CodecError) and "7000" in str(result.exception)

    for broken in [{**cfg, "d": None}, {k: v for k, v in cfg.items() if k != "exact_k"},
                   {**cfg, "surprise": 1}]:
        (tmp_path / "dk" / "compression_config.yaml").write_text(yaml.safe_dump(broken))
        run.n += 1
        assert isinstance(run(tmp_path / "dk").exception, ConfigError)


@pytest.mark.parametrize("preset", ["distillkit-recommended", "distillkit-budget"])
def test_export_is_readable_by_the_layout(tmp_path, preset):
    docs = make_documents(6, seed=7)
    for doc in docs:   # DistillKit needs a row at every position but the last
        doc.teacher_mask = None
        doc.topk_ids, doc.topk_logprobs = (torch.from_numpy(a) for a in
                                           topk_rows(doc.num_tokens, 128, seed=len(doc.doc_id)))
    src = write_dataset(tmp_path / "kd", docs)
    result = CliRunner().invoke(export, ["--format", "distillkit", "--codec", preset, src,
                                         str(tmp_path / "dk")])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "dk" / "compression_config.yaml").read_text())
    assert cfg["d"] == VOCAB and cfg["k"] == {"distillkit-recommended": 128,
                                              "distillkit-budget": 50}[preset]
    rows = pq.read_table(tmp_path / "dk" / "data_0.parquet").to_pylist()
    kept = [d for d in docs if d.num_tokens > 1]
    assert len(rows) == len(kept)
    read_back = []
    for row, doc in zip(rows, kept):
        n = doc.num_tokens - 1
        assert row["input_ids"] == doc.input_ids.tolist()
        assert len(row["compressed_logprobs"]) == len(row["bytepacked_indices"]) == n
        vals = np.array([read_row(bytes(r), cfg) for r in row["compressed_logprobs"]])
        ids = [read_ids(bytes(r), cfg["k"], cfg["d"]) for r in row["bytepacked_indices"]]
        assert ids == doc.topk_ids[:n, :cfg["k"]].tolist()
        ref = doc.topk_logprobs[:n, :cfg["k"]].double().numpy()
        head = slice(0, cfg["exact_k"])   # bf16: half a unit in the 8th bit
        assert (np.abs(vals[:, head] - ref[:, head]) <= np.abs(ref[:, head]) * 2 ** -8).all()
        assert np.abs(vals - ref).mean() < {"distillkit-recommended": 0.1,
                                            "distillkit-budget": 0.5}[preset]
        read_back.append(vals)
    # and kdpipe's importer reads the export as the layout says
    result = CliRunner().invoke(import_, ["--format", "distillkit", str(tmp_path / "dk"),
                                          str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    for vals, doc in zip(read_back, Dataset(str(tmp_path / "back")).iter_documents()):
        np.testing.assert_allclose(doc.topk_logprobs.numpy(), vals, rtol=1e-5, atol=1e-4)


def test_export_refuses_positions_without_teacher_rows(tmp_path):
    docs = make_documents(4, seed=8)   # document 0 has holes in its teacher mask
    src = write_dataset(tmp_path / "kd", docs)
    result = CliRunner().invoke(export, ["--format", "distillkit", src, str(tmp_path / "dk")])
    assert isinstance(result.exception, DatasetError)
    result = CliRunner().invoke(export, ["--format", "distillkit", "--codec", "default", src,
                                         str(tmp_path / "dk2")])
    assert isinstance(result.exception, ConfigError)
