"""DistillKit's offline format, both ways.

A DistillKit dataset is a directory of Parquet files with one row per document::

    input_ids            list<uint64>         n + 1 token ids
    compressed_logprobs  list<list<uint8>>    n byte rows, the value layout of
                                              ``compress.codecs.poly``
    bytepacked_indices   list<list<uint8>>    n byte rows, ids packed at ceil(log2 d) bits

plus ``compression_config.yaml`` (its ``DistributionQuantizationConfig``: d, k, exact_k,
exact_dtype, polynomial_terms, term_dtype, residual_bins, delta_encoding,
error_diffusion, normalize_t). Row j is the distribution over ``input_ids[j + 1]``:
kdpipe's row j of the same document, whose last position has no row (``teacher_mask``).

Import decodes with the ``distillkit`` value kind (DistillKit's own decoder arithmetic)
and writes any kdpipe codec (``exact`` by default: what DistillKit's trainer would see,
kept losslessly). Export encodes with a ``distillkit`` codec (fitted in float64); loss
masks and hidden states have no place in the format and are not written, and every
position but the last must have a teacher row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from kdpipe.schemas import (CaptureSettings, CodecConfig, ComponentSpec, ConfigError, DatasetError,
                            TeacherDocument, TeacherInfo)

from ..codec import Codec, signal_of
from ..codecs.ids import vocab_bits
from ..outputs import ExportDir, prepare_dataset_output
from ..reader import Dataset
from . import require_topk
from ..writer import PartWriter

CONFIG_FILE = "compression_config.yaml"
_DATA_FILE = re.compile(r"^data_\d+\.parquet$")
COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")
VALUE_KEYS = ("exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins",
              "delta_encoding", "error_diffusion", "normalize_t")
# DistillKit's defaults for keys its YAML may omit (DistributionQuantizationConfig)
DEFAULTS = {"exact_dtype": "float32", "polynomial_terms": None, "term_dtype": "float32",
            "delta_encoding": True, "error_diffusion": False, "normalize_t": False}


def schema() -> pa.Schema:
    return pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                      pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                      pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])


def codec_from_config(config: dict[str, Any], name: str = "distillkit") -> tuple[CodecConfig, int]:
    """A DistillKit compression config -> (the kdpipe codec that reads its rows, d)."""
    if not isinstance(config, dict):
        raise ConfigError(f"DistillKit compression config must be a mapping, got {config!r}")
    missing = [key for key in ("d", "k", "exact_k") if key not in config]
    if missing:
        raise ConfigError(f"DistillKit compression config lacks {missing}")
    unknown = sorted(set(config) - set(VALUE_KEYS) - {"d", "k"})
    if unknown:
        raise ConfigError(f"DistillKit compression config has unknown keys {unknown}")
    d, k = config["d"], config["k"]
    if not isinstance(d, int) or d < 1 or not isinstance(k, int) or k < 1:
        raise ConfigError(f"DistillKit compression config: d={d!r} and k={k!r} must be "
                          f"positive integers")
    values = {key: config.get(key, DEFAULTS.get(key)) for key in VALUE_KEYS}
    values["residual_bins"] = values["residual_bins"] or []
    codec = CodecConfig(name=name, ids=ComponentSpec("packed", {"bits": vocab_bits(d)}),
                        values=ComponentSpec("distillkit", values),
                        hidden=ComponentSpec("native"), top_k=k)
    return codec, d


def config_from_codec(codec: CodecConfig, vocab_size: int, k: int) -> dict[str, Any]:
    """A kdpipe codec in DistillKit's layout -> its ``compression_config.yaml`` mapping."""
    if codec.ids.kind != "packed" or codec.values.kind != "distillkit":
        raise ConfigError(f"codec {codec.name!r} is not in DistillKit's layout (needs ids "
                          f"'packed' and values 'distillkit', has {codec.ids.kind!r} and "
                          f"{codec.values.kind!r})")
    bits = codec.ids.params.get("bits") or vocab_bits(vocab_size)
    if bits != vocab_bits(vocab_size):
        raise ConfigError(f"DistillKit packs ids at ceil(log2 d) = {vocab_bits(vocab_size)} "
                          f"bits for this vocabulary; the codec uses {bits}")
    values = {key: codec.values.params.get(key, DEFAULTS.get(key)) for key in VALUE_KEYS}
    values["residual_bins"] = values["residual_bins"] or []
    return {"d": vocab_size, "k": k, **values}


def _shard_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.parquet"),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not files:
        raise DatasetError("no Parquet files: not a DistillKit offline dataset", file=str(src))
    return files


def _open_parquet(path: Path) -> pq.ParquetFile:
    """A DistillKit data file, refused by name if it is not Parquet or lacks its columns."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"not a readable Parquet file: {e}", file=str(path)) from e
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise DatasetError(f"missing columns {missing} (has {pf.schema_arrow.names}): not a "
                           f"DistillKit data file", file=str(path))
    return pf


def _check_source_dir(src: Path) -> None:
    if not src.exists():
        raise DatasetError("no such directory", file=str(src))
    if not src.is_dir():
        raise DatasetError(f"is a file; a DistillKit dataset is a directory of Parquet files "
                           f"with a {CONFIG_FILE}", file=str(src))
    if not (src / CONFIG_FILE).exists():
        kdpipe = " (it is a kdpipe dataset)" if (src / "manifest.json").exists() else ""
        raise DatasetError(f"no {CONFIG_FILE}: not a DistillKit offline dataset{kdpipe}",
                           file=str(src))


def _byte_rows(column: pa.ChunkedArray, width: int, what: str, file: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """list<list<uint8>> of a batch -> ([total rows, width] uint8, rows per document)."""
    outer = column.combine_chunks()
    inner = outer.flatten()
    lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        raise DatasetError(f"byte row {int(bad[0])} has {int(lengths[bad[0]])} bytes, the "
                           f"configuration gives {width}", file=file, field=what)
    flat = inner.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width), pc.list_value_length(outer).to_numpy(zero_copy_only=False)


def read_documents(src: str | Path, *, batch_rows: int = 256
                   ) -> tuple[CodecConfig, int, Iterator[TeacherDocument]]:
    """Open a DistillKit dataset: (its codec, its d, an iterator of decoded documents)."""
    src = Path(src)
    _check_source_dir(src)
    cfg_path = src / CONFIG_FILE
    try:
        codec_config, d = codec_from_config(yaml.safe_load(cfg_path.read_text()))
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"{cfg_path}: {str(e).replace(chr(10), ' ')}") from e
    codec = Codec(codec_config, vocab_size=d, top_k=codec_config.top_k, hidden_size=0,
                  hidden_dtype="float32")
    files = _shard_files(src)
    for path in files:   # every file checked before anything is written
        _open_parquet(path)

    def documents() -> Iterator[TeacherDocument]:
        for path in files:
            pf = _open_parquet(path)
            first = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
                yield from _decode_batch(codec, pa.Table.from_batches([batch]), str(path),
                                         path.stem, first)
                first += batch.num_rows

    return codec_config, d, documents()


def _decode_batch(codec: Codec, table: pa.Table, file: str, stem: str, first: int
                  ) -> Iterator[TeacherDocument]:
    values, n_values = _byte_rows(table.column("compressed_logprobs"),
                                  codec.values.layout.row_bytes, "compressed_logprobs", file)
    ids, n_ids = _byte_rows(table.column("bytepacked_indices"), codec.ids.row_bytes,
                            "bytepacked_indices", file)
    input_ids = table.column("input_ids").to_pylist()
    for i, (toks, a, b) in enumerate(zip(input_ids, n_values, n_ids)):
        if a != b or a != max(len(toks) - 1, 0):
            raise DatasetError(f"{len(toks)} input ids, {a} value rows and {b} id rows (DistillKit "
                               f"rows are one fewer than ids)", file=file, row=first + i)
    ends = np.cumsum(n_values)
    rows = n_values.tolist()

    def blobs(arr: np.ndarray) -> list[bytes]:   # one document's rows, concatenated
        return [arr[e - n:e].tobytes() for e, n in zip(ends, rows)]

    top_ids, top_lps = codec.decode_rows(blobs(ids), blobs(values), rows)
    for i, (toks, e, n) in enumerate(zip(input_ids, ends, rows)):
        toks = np.asarray(toks, dtype=np.uint64)
        if toks.size and toks.max() >= 2 ** 31:
            raise DatasetError("input id beyond int32", file=file, row=first + i,
                               field="input_ids")
        mask = np.ones(toks.size, dtype=bool)
        mask[-1:] = False
        yield TeacherDocument(doc_id=f"{stem}:{first + i:09d}", input_ids=toks.astype(np.int32),
                              topk_ids=top_ids[e - n:e], topk_logprobs=top_lps[e - n:e],
                              teacher_mask=mask, record_index=first + i)


def import_dataset(src: str | Path, dst: str, *, codec: CodecConfig,
                   vocab_size: int | None = None, overwrite: bool = False) -> int:
    """DistillKit dataset -> kdpipe dataset written with ``codec``; returns documents written.

    ``dst`` must be new, empty or a kdpipe dataset (an interrupted import is resumed; with
    ``overwrite`` an earlier dataset there is replaced)."""
    if signal_of(codec) != "topk":
        raise ConfigError(f"--codec {codec.name}: stores ids sampled from the teacher; a "
                          f"DistillKit dataset holds top-k rows, which cannot be sampled from "
                          f"(import with a top-k codec)")
    dk_codec, d, docs = read_documents(src)
    prepare_dataset_output(dst, sources=[str(src)], overwrite=overwrite)
    vocab = vocab_size or d
    max_len = max((int(n) for f in _shard_files(Path(src))
                   for n in pc.list_value_length(_open_parquet(f).read(columns=["input_ids"])
                                                 .column("input_ids")).to_numpy()), default=0)
    teacher = TeacherInfo(name_or_path=str(src), architecture="unknown (DistillKit import)",
                          config_sha256="", vocab_size=vocab, hidden_size=0,
                          num_hidden_layers=0, tokenizer_sha256="", special_tokens={},
                          dtype="float32")
    capture = CaptureSettings(backend="distillkit-import", top_k=dk_codec.top_k,
                              max_seq_len=max_len, dtype="float32", chat_template=False,
                              hidden_layers=[], text_field="", long_documents="truncate",
                              data_source=str(Path(src).resolve()))
    written = 0
    with PartWriter(dst, teacher=teacher, capture=capture, codec=codec, index=0,
                    count=1) as writer:
        if writer.complete:
            raise ConfigError(f"{dst} already holds a complete import; use another destination "
                              f"or --overwrite")
        for i, doc in enumerate(docs):
            if i >= writer.next_record:  # a rerun resumes after what is committed
                writer.add_record(i, [doc])
                writer.end_window()
                written += 1
        writer.finish()
    return written


# -- export -----------------------------------------------------------------------------------

def _list_of_rows(rows: np.ndarray, per_doc: list[int]) -> pa.Array:
    """[total, width] uint8 and rows per document -> list<list<uint8>>."""
    width = rows.shape[1]
    inner = pa.ListArray.from_arrays(pa.array(np.arange(rows.shape[0] + 1) * width, pa.int32()),
                                     pa.array(rows.reshape(-1), pa.uint8()))
    return pa.ListArray.from_arrays(pa.array(np.cumsum([0] + per_doc), pa.int32()), inner)


def is_export_file(name: str) -> bool:
    """A file name this export writes."""
    return name == CONFIG_FILE or bool(_DATA_FILE.match(name))


def export_dataset(dataset: Dataset, out: str | Path, *, codec: CodecConfig,
                   docs_per_file: int = 1024, overwrite: bool = False) -> int:
    """kdpipe dataset -> DistillKit dataset encoded with ``codec`` (DistillKit's layout).

    Every position but the last must have a teacher row: DistillKit has no mask for
    missing rows. ``out`` must be new, empty or (with ``overwrite``) an earlier DistillKit
    export. Returns the number of documents written.
    """
    m = dataset.manifest
    require_topk(m.codec, dataset.uri, "DistillKit")
    k = codec.top_k or m.capture.top_k
    config = config_from_codec(codec, m.teacher.vocab_size, k)
    enc = Codec(codec, vocab_size=m.teacher.vocab_size, top_k=m.capture.top_k, hidden_size=0,
                hidden_dtype="float32")
    buf: list[tuple[np.ndarray, bytes, bytes, int]] = []
    files = written = 0
    with ExportDir(out, sources=[dataset.uri], overwrite=overwrite,
                   is_export_file=is_export_file) as target:
        target.write_text(CONFIG_FILE, yaml.safe_dump(config, sort_keys=True))

        def flush() -> None:
            nonlocal files, buf
            if not buf:
                return
            per_doc = [n for *_, n in buf]
            ids = np.frombuffer(b"".join(b[1] for b in buf), np.uint8) \
                .reshape(-1, enc.ids.row_bytes)
            vals = np.frombuffer(b"".join(b[2] for b in buf), np.uint8) \
                .reshape(-1, enc.values.layout.row_bytes)
            table = pa.Table.from_arrays(
                [pa.array([b[0] for b in buf], pa.list_(pa.uint64())),
                 _list_of_rows(vals, per_doc), _list_of_rows(ids, per_doc)], schema=schema())
            target.write_table(f"data_{files}.parquet", table)
            files += 1
            buf = []

        for doc in dataset.iter_documents(hidden_layers=[]):
            n = doc.num_tokens - 1
            if n < 1:
                continue
            mask = doc.teacher_mask
            if mask is not None and not mask[:n].all():
                raise DatasetError("positions without a teacher row cannot be exported to "
                                   "DistillKit (it has no mask for them)", row=doc.record_index,
                                   field=doc.doc_id)
            ids_b, vals_b = enc.encode_rows(doc.topk_ids[:n].numpy(),
                                            doc.topk_logprobs[:n].numpy())
            buf.append((doc.input_ids.astype(np.uint64), ids_b, vals_b, n))
            written += 1
            if len(buf) >= docs_per_file:
                flush()
        flush()
    return written
