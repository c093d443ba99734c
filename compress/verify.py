"""Dataset checks (``kdpipe verify``) and statistics (``kdpipe inspect``, ``kdpipe dump``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from kdpipe.schemas import DatasetError, KdpipeError, ShardEntry
from kdpipe.schemas import arrow as cols

from .dense import HEAD_ARTIFACT, dense_layer, full_logprobs, load_head
from .manifests import manifest_files, read_manifest
from .reader import Dataset, check_sha256
from .storage import Storage

_LOGPROB_SLACK = 1e-4  # lossy codecs may reconstruct tiny positive log-probs


@dataclass
class ShardProblem:
    file: str
    message: str


@dataclass
class VerifyReport:
    shards_checked: int = 0
    documents_checked: int = 0
    artifacts_checked: int = 0
    problems: list[ShardProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_rows(ds: Dataset, entry: ShardEntry, pf: pq.ParquetFile,
                progress: Callable[[int], object]) -> int:
    """Decode every row group and check the invariants; returns documents checked.
    ``progress`` is told the documents of each row group checked."""
    where = ds.storage.describe(entry.file)
    vocab, n_docs, tokens, rows = ds.manifest.teacher.vocab_size, 0, 0, 0
    for rg in range(pf.num_row_groups):
        table = ds.read_row_group(entry, pf, rg, ds.columns())
        docs = ds.decode_table(table, where=where)
        for i, doc in enumerate(docs):
            row = n_docs + i
            ids, lps = doc.topk_ids, doc.topk_logprobs
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise DatasetError(f"token id outside [0, {vocab})", file=where, row=row,
                                   field=cols.TOPK_IDS)
            if not bool(torch.isfinite(lps).all()):
                raise DatasetError("non-finite log-prob", file=where, row=row,
                                   field=cols.TOPK_VALUES)
            if lps.numel() and float(lps.max()) > _LOGPROB_SLACK:
                raise DatasetError(f"log-prob {float(lps.max()):.3g} > 0", file=where, row=row,
                                   field=cols.TOPK_VALUES)
            if lps.shape[1] > 1 and bool((lps[:, 1:] > lps[:, :-1]).any()):
                raise DatasetError("log-probs not sorted descending", file=where, row=row,
                                   field=cols.TOPK_VALUES)
            tail = doc.tail_mass
            if tail is not None and tail.numel() and \
                    not bool(((tail >= 0) & (tail <= 1)).all()):
                raise DatasetError("stored missing mass outside [0, 1]", file=where, row=row,
                                   field=cols.TOPK_VALUES)
            if ids.shape[1] > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
                raise DatasetError("repeated token id within a row", file=where, row=row,
                                   field=cols.TOPK_IDS)
            if doc.sample_ids is not None:
                _check_samples(doc.sample_ids, doc.sample_counts, ds.codec.k, vocab, where, row)
            ii = doc.input_ids
            if ii.size and (int(ii.min()) < 0 or int(ii.max()) >= vocab):
                raise DatasetError(f"input id outside [0, {vocab})", file=where, row=row,
                                   field=cols.INPUT_IDS)
            if doc.loss_mask is not None and doc.loss_mask.shape[0] != doc.num_tokens:
                raise DatasetError("loss_mask length differs from input_ids", file=where,
                                   row=row, field=cols.LOSS_MASK)
            for layer, h in doc.hidden.items():
                if not bool(torch.isfinite(h).all()):
                    raise DatasetError("non-finite hidden state", file=where, row=row,
                                       field=cols.hidden_column(layer))
            tokens += doc.num_tokens
            rows += doc.num_teacher_rows
        n_docs += len(docs)
        progress(len(docs))
    if tokens != entry.tokens or rows != entry.teacher_rows:
        raise DatasetError(f"holds {tokens} tokens / {rows} teacher rows, the manifest says "
                           f"{entry.tokens} / {entry.teacher_rows}", file=where)
    return n_docs


def _check_samples(ids: torch.Tensor, counts: torch.Tensor, draws: int, vocab: int, where: str,
                   row: int) -> None:
    """A sampled row: distinct ids in the vocabulary, padding (-1, 0) last, counts adding up
    to the draws."""
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab):
        raise DatasetError(f"sampled token id outside [0, {vocab})", file=where, row=row,
                           field=cols.TOPK_IDS)
    if bool(((ids < 0) != (counts == 0)).any()) or bool((counts < 0).any()):
        raise DatasetError("sampled ids and counts disagree on padding", file=where, row=row,
                           field=cols.TOPK_VALUES)
    if bool((counts.sum(1) != draws).any()):
        raise DatasetError(f"sampled counts do not add up to {draws} draws", file=where,
                           row=row, field=cols.TOPK_VALUES)
    live = ids.masked_fill(ids < 0, vocab).sort(dim=1).values
    if ids.shape[1] > 1 and bool(((live.diff(dim=1) == 0) & (live[:, 1:] < vocab)).any()):
        raise DatasetError("repeated sampled token id within a row", file=where, row=row,
                           field=cols.TOPK_IDS)


def _check_artifact(ds: Dataset, rel: str, entry) -> None:
    where = ds.storage.describe(rel)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise DatasetError("artifact entry in the manifest has no sha256", file=where)
    if not ds.storage.exists(rel):
        raise DatasetError("codec artifact listed in the manifest is missing", file=where)
    size = ds.storage.size(rel)
    if "bytes" in entry and size != entry["bytes"]:
        raise DatasetError(f"artifact has {size} bytes, the manifest says {entry['bytes']} "
                           f"(truncated or replaced)", file=where)
    check_sha256(ds.storage, rel, entry["sha256"])


def verify_dataset(uri: str, *, deep: bool = False, progress: bool = False) -> VerifyReport:
    """Check every codec artifact's presence and sha256, and every shard's presence, size,
    sha256, schema and codec (and rows, if deep), and that every manifest file is intact.

    ``progress``: a bar on stderr (documents when deep, else shards), shown only when
    stderr is a terminal."""
    report = VerifyReport()
    storage = Storage(uri)
    for rel in manifest_files(storage):
        try:
            read_manifest(storage, rel)
        except KdpipeError as e:
            report.problems.append(ShardProblem(rel, str(e)))
    if report.problems:  # the dataset's description itself is damaged: nothing to check against
        return report
    ds = Dataset(uri)
    for rel, entry in sorted(ds.manifest.artifacts.items()):
        report.artifacts_checked += 1
        try:
            _check_artifact(ds, rel, entry)
        except KdpipeError as e:
            report.problems.append(ShardProblem(rel, str(e)))
        except Exception as e:  # anything a damaged file makes a library raise
            report.problems.append(ShardProblem(rel, f"{ds.storage.describe(rel)}: "
                                                     f"unreadable: {e}"))
    if ds.manifest.codec.dense:   # its head: listed, intact (checked above), and fitting
        try:
            load_head(ds)
        except KdpipeError as e:
            report.problems.append(ShardProblem(HEAD_ARTIFACT, str(e)))
    bar = tqdm(total=ds.manifest.documents if deep else len(ds.shards),
               unit="doc" if deep else "shard", desc="verify", file=sys.stderr,
               disable=None if progress else True)
    with bar:
        for entry in ds.shards:
            where = ds.storage.describe(entry.file)
            report.shards_checked += 1
            done = bar.n
            try:
                pf = ds.open_shard(entry, verify_sha256=True)
                report.documents_checked += _check_rows(ds, entry, pf, bar.update) if deep \
                    else entry.documents
            except KdpipeError as e:
                report.problems.append(ShardProblem(entry.file, str(e)))
            except Exception as e:  # anything a damaged file makes a library raise
                report.problems.append(ShardProblem(entry.file, f"{where}: unreadable: {e}"))
            # a shard's count, also for the part of a bad shard that was not checked
            bar.update(done + (entry.documents if deep else 1) - bar.n)
    return report


def dataset_stats(uri: str) -> dict:
    """What ``kdpipe inspect`` prints: identity, settings, counts and bytes per token."""
    ds = Dataset(uri, allow_incomplete=True)
    m = ds.manifest
    split = {"ids": 0, "values": 0, "hidden": 0, "tokens_and_masks": 0}
    for entry in ds.shards:
        md = ds.open_shard(entry).metadata
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                name = col.path_in_schema.split(".")[0]
                key = ("ids" if name == cols.TOPK_IDS else "values" if name == cols.TOPK_VALUES
                       else "hidden" if name.startswith(cols.HIDDEN_PREFIX)
                       else "tokens_and_masks")
                split[key] += col.total_compressed_size
    tokens = max(m.tokens, 1)
    return {
        "uri": uri, "complete": m.complete, "format_version": m.format_version,
        "producer": m.producer, "teacher": vars(m.teacher), "capture": vars(m.capture),
        "codec": m.codec.to_dict(), "signal": ds.codec.signal, "documents": m.documents,
        "tokens": m.tokens,
        "teacher_rows": sum(s.teacher_rows for s in m.shards), "shards": len(m.shards),
        "bytes": m.total_bytes, "bytes_per_token": m.total_bytes / tokens,
        "bytes_per_token_split": {k: v / tokens for k, v in split.items()},
        "records": vars(m.records), "parts": [vars(p) for p in m.parts],
    }


def dump_arrays(uri: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """Decoded arrays per document, rows without a teacher row as id -1 / log-prob -inf
    (and, where the codec stores the missing mass, ``tail_mass`` NaN); for the sampled
    signal ``sample_ids`` / ``sample_counts`` [T, m] instead of the top-k (id -1, count 0
    for padding and rows without a teacher row); for a dense dataset also ``logprobs``
    [T, V], the full distributions rebuilt at every position."""
    ds = Dataset(uri)
    head = load_head(ds) if ds.manifest.codec.dense else None
    arrays: dict[str, np.ndarray] = {}
    for n, doc in enumerate(ds.iter_documents()):
        if limit is not None and n >= limit:
            break
        T, k = doc.num_tokens, doc.topk_ids.shape[1]
        tmask = np.ones(T, bool) if doc.teacher_mask is None else doc.teacher_mask
        p = doc.doc_id
        arrays[f"{p}/input_ids"] = doc.input_ids.astype(np.int64)
        arrays[f"{p}/teacher_mask"] = tmask
        if doc.sample_ids is not None:   # the sampled signal, m = the most distinct ids of a row
            m = max(1, int((doc.sample_counts > 0).sum(1).max())) if len(doc.sample_ids) else 1
            ids = np.full((T, m), -1, np.int64)
            counts = np.zeros((T, m), np.int32)
            ids[tmask] = doc.sample_ids[:, :m].numpy()
            counts[tmask] = doc.sample_counts[:, :m].numpy()
            arrays[f"{p}/sample_ids"] = ids
            arrays[f"{p}/sample_counts"] = counts
        else:
            ids = np.full((T, k), -1, np.int64)
            lps = np.full((T, k), -np.inf, np.float32)
            ids[tmask] = doc.topk_ids.numpy()
            lps[tmask] = doc.topk_logprobs.numpy()
            arrays[f"{p}/topk_ids"] = ids
            arrays[f"{p}/topk_logprobs"] = lps
        if doc.tail_mass is not None:
            tail = np.full(T, np.nan, np.float32)
            tail[tmask] = doc.tail_mass.numpy()
            arrays[f"{p}/tail_mass"] = tail
        if doc.loss_mask is not None:
            arrays[f"{p}/loss_mask"] = doc.loss_mask
        for layer, h in doc.hidden.items():
            arrays[f"{p}/hidden/{layer}"] = h.numpy().astype(np.float32)
        if head is not None:
            arrays[f"{p}/logprobs"] = full_logprobs(head, doc.hidden[dense_layer(ds.manifest)]) \
                .numpy()
    return arrays
