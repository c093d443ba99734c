"""Export to axolotl's knowledge-distillation form (its KD plugin, pre-tokenized).

One Parquet row per document of T tokens, every per-token list of length T::

    input_ids         list<int64>          the tokens
    labels            list<int64>          the token, or -100 where it is not trained on
    attention_mask    list<int64>          1
    target_token_ids  list<list<int64>>    K teacher ids per row
    target_logprobs   list<list<float32>>  their log-probs
    target_mask       list<list<int64>>    1 for a slot the loss uses

Row j is the teacher's distribution over ``input_ids[j + 1]`` (kdpipe's row j).
``target_mask[j]`` is 0 where ``labels[j + 1] == -100``, where the position has no
teacher row, and on the last row (it would describe a token outside the sequence); rows
without a teacher row are padded with id 0 and log-prob -1e9, as axolotl's collator pads.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..outputs import ExportDir
from ..reader import Dataset
from . import require_topk

IGNORE = -100
PAD_LOGPROB = -1e9
_DATA_FILE = re.compile(r"^data_\d+\.parquet$")


def is_export_file(name: str) -> bool:
    """A file name this export writes."""
    return bool(_DATA_FILE.match(name))


def schema() -> pa.Schema:
    ints, nested = pa.list_(pa.int64()), pa.list_(pa.list_(pa.int64()))
    return pa.schema([pa.field("input_ids", ints), pa.field("labels", ints),
                      pa.field("attention_mask", ints), pa.field("target_token_ids", nested),
                      pa.field("target_logprobs", pa.list_(pa.list_(pa.float32()))),
                      pa.field("target_mask", nested)])


def document_row(input_ids: np.ndarray, ids: np.ndarray, lps: np.ndarray,
                 loss_mask: np.ndarray | None, teacher_mask: np.ndarray | None
                 ) -> dict[str, np.ndarray]:
    """One kdpipe document (its [N, k] rows) -> axolotl's columns as arrays."""
    t, k = input_ids.shape[0], ids.shape[1]
    has_row = np.ones(t, bool) if teacher_mask is None else teacher_mask.astype(bool)
    labels = input_ids.astype(np.int64)
    if loss_mask is not None:  # loss_mask[j]: row j (predicting token j + 1) is trained on
        labels = labels.copy()
        labels[1:][~loss_mask[:-1]] = IGNORE
    token_ids = np.zeros((t, k), np.int64)
    logprobs = np.full((t, k), PAD_LOGPROB, np.float32)
    token_ids[has_row], logprobs[has_row] = ids, lps
    trained = has_row.copy()
    trained[-1:] = False
    trained[:-1] &= labels[1:] != IGNORE
    mask = (trained[:, None] & np.isfinite(logprobs)).astype(np.int64)
    return {"input_ids": input_ids.astype(np.int64), "labels": labels,
            "attention_mask": np.ones(t, np.int64), "target_token_ids": token_ids,
            "target_logprobs": logprobs, "target_mask": mask}


def _column(arrays: list[np.ndarray], field: pa.Field) -> pa.Array:
    lengths = [a.shape[0] for a in arrays]
    offsets = pa.array(np.cumsum([0] + lengths), pa.int32())
    flat = np.concatenate(arrays) if arrays else np.zeros((0,))
    if pa.types.is_list(field.type.value_type):
        k = flat.shape[1] if flat.ndim == 2 else 0
        inner = pa.ListArray.from_arrays(pa.array(np.arange(flat.shape[0] + 1) * k, pa.int32()),
                                         pa.array(flat.reshape(-1),
                                                  field.type.value_type.value_type))
        return pa.ListArray.from_arrays(offsets, inner)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, field.type.value_type))


def export_dataset(dataset: Dataset, out: str | Path, *, docs_per_file: int = 1024,
                   overwrite: bool = False) -> int:
    """kdpipe dataset -> axolotl KD Parquet files ``data_{i}.parquet``; returns documents.

    ``out`` must be new, empty or (with ``overwrite``) an earlier export of this format."""
    require_topk(dataset.manifest.codec, dataset.uri, "axolotl")
    sch = schema()
    buf: list[dict[str, np.ndarray]] = []
    files = written = 0
    with ExportDir(out, sources=[dataset.uri], overwrite=overwrite,
                   is_export_file=is_export_file) as target:

        def flush() -> None:
            nonlocal files, buf
            if buf:
                table = pa.Table.from_arrays([_column([b[f.name] for b in buf], f)
                                              for f in sch], schema=sch)
                target.write_table(f"data_{files}.parquet", table)
                files += 1
                buf = []

        for doc in dataset.iter_documents(hidden_layers=[]):
            buf.append(document_row(doc.input_ids, doc.topk_ids.numpy(),
                                    doc.topk_logprobs.numpy(), doc.loss_mask, doc.teacher_mask))
            written += 1
            if len(buf) >= docs_per_file:
                flush()
        flush()
    return written
