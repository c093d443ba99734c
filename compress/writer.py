"""Writing one part of a dataset: encoded documents into Parquet shards, then the fragment.

Crash safety: a shard is written under a temporary name and renamed when whole; only
then, at the end of the caller's window, is it listed in the part's fragment, which is
itself replaced atomically. A killed writer therefore leaves at most temporary files or
unlisted shards of its own part, removed when the part is reopened, and resumption
starts at the fragment's ``next_record``. Shard names are deterministic, so a resumed
run rewrites the same files an uninterrupted one would.

A ``PartWriter`` is a context manager: leaving the block commits what was added, leaving
it by an exception (a signal's ``Interrupted`` included) aborts instead, keeping only whole,
listed shards; either way its thread pools are shut down.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import posixpath
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.runtime import StageTimes
from kdpipe.schemas import (CaptureSettings, CodecConfig, ConfigError, DatasetError, Manifest,
                            PartState, RecordCounts, ShardEntry, TeacherDocument, TeacherInfo,
                            hidden_column, shard_schema)
from kdpipe.schemas import arrow as cols
from kdpipe.schemas.layout import (PARTS_DIR, SHARDS_DIR, TMP_PREFIX, fragment_path,
                                   shard_path)

from .codec import Codec, side_data_param
from .dense import HEAD_ARTIFACT
from .manifests import (load_manifest_or_fragments, read_manifest, write_fragment,
                        write_manifest_if_complete)
from .reader import ArtifactLoader, artifact_relpath
from .storage import HashingWriter, Storage

PARQUET_ZSTD_LEVEL = 3
ENCODE_THREADS = min(8, os.cpu_count() or 1)
QUEUED_RECORDS = 256     # records whose documents wait for the window's end, at most
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{8}-(.+)")   # Storage.atomic_output's


@dataclasses.dataclass(frozen=True)
class EncodedHidden:
    """A document's hidden states of one layer, already encoded with the part's codec
    (``Codec.encode_hidden_tensor``, e.g. on the GPU that computed them) and stored as given:
    capture encodes on the teacher's GPU and writes in another process."""

    data: np.ndarray   # 1-D uint8


def parquet_options(schema: pa.Schema, codec: Codec, *, zstd_hidden: bool = False) -> dict:
    """ParquetWriter options: zstd per column, except the columns whose codec component
    entropy-codes its bytes itself (zstd over zstd frames costs time and saves nothing) and,
    unless ``zstd_hidden``, the hidden states. Those are floats that zstd shrinks by a fifth at
    most, and Parquet compresses in one thread: on an H200 capturing AFM-4.5B with four fp8
    layers (10 KB/token), zstd on them held capture at 38% of the teacher's forward rate."""
    raw = {name for name, component in ((cols.TOPK_IDS, codec.ids),
                                        (cols.TOPK_VALUES, codec.values))
           if component.capabilities.entropy_coded}
    if codec.hidden.capabilities.entropy_coded or not zstd_hidden:
        raw |= {f.name for f in schema if f.name.startswith(cols.HIDDEN_PREFIX)}
    compression, level = {}, {}
    for path in _leaf_paths(schema):
        if path.split(".")[0] in raw:
            compression[path] = "none"
        else:
            compression[path], level[path] = "zstd", PARQUET_ZSTD_LEVEL
    return dict(compression=compression, compression_level=level,
                use_dictionary=[cols.DOC_ID], write_statistics=[cols.DOC_ID, cols.NUM_TOKENS],
                write_page_checksum=True)


@functools.lru_cache(maxsize=16)
def _leaf_paths_cached(schema: pa.Schema) -> tuple[str, ...]:
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    meta = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return tuple(meta.column(i).path for i in range(len(meta)))


def _leaf_paths(schema: pa.Schema) -> tuple[str, ...]:
    """Parquet column paths of a schema (``input_ids.list.element``...), which is what
    per-column writer options are keyed by."""
    return _leaf_paths_cached(schema.remove_metadata())


def _io_guard(method):
    """Turn an I/O failure (disk full, lost mount, object-store error) into a DatasetError that
    says what was kept, after dropping the shard in progress so nothing partial is visible."""
    @functools.wraps(method)
    def guarded(self: "PartWriter", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            self.abort()
            raise DatasetError(
                f"write failed ({e}); the shard in progress was discarded and nothing partial "
                f"is listed; fix the cause (e.g. free space) and rerun the same command to "
                f"resume from record {self.next_record}",
                file=self.storage.describe("")) from e
    return guarded


def _describe_diff(a, b) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k}: existing {db.get(k)!r} vs requested {da.get(k)!r}"
            for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


def _artifact_refs(codec: CodecConfig) -> set[str]:
    """Dataset files a codec configuration names (its hidden codec's side data, a dense
    codec's teacher head)."""
    ref = codec.hidden.params.get(side_data_param(codec) or "")
    return ({ref} if isinstance(ref, str) else set()) | ({HEAD_ARTIFACT} if codec.dense else set())


class PartWriter:
    """Writes part ``index`` of ``count`` of a dataset; resumable, one process per part.

    ``artifacts`` are codec side data (relative path under ``artifacts/`` -> bytes, e.g.
    the low-rank projection that ``compress.fidelity.resolve_lowrank`` returns). They
    are written before the first shard and listed in the fragment with their sha256;
    every part of a dataset must carry the same ones. A resumed writer, or a part of a
    dataset whose other parts already wrote them, may leave ``artifacts`` out.

    ``times`` receives the seconds of its stages: ``encode_topk`` (summed over the encoder
    threads), ``encode_hidden``, ``parquet`` (row groups: encoding, checksums, the write) and
    ``commit`` (closing shards, saving the fragment).
    """

    def __init__(self, uri: str, *, teacher: TeacherInfo, capture: CaptureSettings,
                 codec: CodecConfig, index: int, count: int, docs_per_shard: int = 0,
                 shard_bytes: int = 512 << 20, row_group_bytes: int = 32 << 20,
                 artifacts: dict[str, bytes] | None = None, zstd_hidden: bool = False,
                 times: StageTimes | None = None) -> None:
        if not 0 <= index < count:
            raise ConfigError(f"--shard-index {index} must be in [0, {count})")
        if codec.dense and teacher.num_hidden_layers not in capture.hidden_layers:
            raise ConfigError(f"codec {codec.name!r} is dense: it needs the teacher's last layer "
                              f"({teacher.num_hidden_layers}) among the hidden layers, which "
                              f"are {list(capture.hidden_layers)}")
        self.times = times if times is not None else StageTimes()
        self.storage = Storage(uri)
        self.index, self.count = index, count
        self.docs_per_shard, self.shard_bytes = docs_per_shard, shard_bytes
        self.row_group_bytes = row_group_bytes
        self.frag_rel = fragment_path(index, count)
        self.manifest = self._open_fragment(teacher, capture, codec)
        self.hidden_layers = list(capture.hidden_layers)
        self.schema = shard_schema(self.hidden_layers, codec=codec,
                                   teacher=dataclasses.asdict(teacher),
                                   capture=capture.to_dict())
        self._stack: ExitStack | None = None
        self._pq: pq.ParquetWriter | None = None
        # Parquet encoding, page checksums, hashing and the file write run on their own thread,
        # one row group at a time, while the caller encodes the next documents
        self._io = ThreadPoolExecutor(1, thread_name_prefix="kdpipe-parquet")
        self._io_pending: Future | None = None
        # top-k rows are encoded by a pool of threads (numpy and zstd release the GIL) between
        # a record's arrival and the window's end, where documents are appended in order
        self._encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="kdpipe-encode")
        self._queued: list[tuple[int, list[tuple[TeacherDocument, Future]]]] = []
        self._closed: list[ShardEntry] = []    # shards closed since the last commit, unlisted
        self._reset_shard()
        self._reset_window()
        self._clean_leftovers()
        self._store_artifacts(artifacts or {}, codec)
        self.codec = Codec(codec, vocab_size=teacher.vocab_size, top_k=capture.top_k,
                           hidden_size=teacher.hidden_size, hidden_dtype=teacher.dtype,
                           artifacts=ArtifactLoader(self.storage, self.manifest.artifacts))
        self.parquet_options = parquet_options(self.schema, self.codec, zstd_hidden=zstd_hidden)

    # -- opening / resuming ---------------------------------------------------------

    def _open_fragment(self, teacher, capture, codec) -> Manifest:
        existing = None
        if self.storage.exists(self.frag_rel):
            existing = read_manifest(self.storage, self.frag_rel)
        else:
            others = load_manifest_or_fragments(self.storage, allow_incomplete=True,
                                                missing_ok=True)
            if others is not None:
                existing = others
                if others.parts and others.parts[0].count != self.count:
                    raise ConfigError(
                        f"{self.storage.describe('')}: holds a dataset captured in "
                        f"{others.parts[0].count} parts; this run asks for {self.count}")
        if existing is not None:
            problems = []
            if existing.teacher != teacher:
                problems += [f"teacher {d}" for d in _describe_diff(teacher, existing.teacher)]
            if existing.capture.fingerprint() != capture.fingerprint():
                problems += [f"capture {d}" for d in _describe_diff(capture, existing.capture)]
                if existing.capture.data_fingerprint != capture.data_fingerprint:
                    problems.append("the input's content changed since this capture began "
                                    "(data_fingerprint: file sizes or first/last bytes)")
            if existing.codec.fingerprint() != codec.fingerprint():
                problems.append(f"codec: existing {existing.codec.to_json()} vs requested "
                                f"{codec.to_json()}")
            if problems:
                raise ConfigError(
                    f"{self.storage.describe('')} already holds a capture with a different "
                    f"configuration; use another --out or the same settings:\n  "
                    + "\n  ".join(problems))
        if existing is not None and self.storage.exists(self.frag_rel):
            return existing
        return Manifest(teacher=teacher, capture=capture, codec=codec,
                        parts=[PartState(index=self.index, count=self.count)])

    @_io_guard
    def _store_artifacts(self, given: dict[str, bytes], codec: CodecConfig) -> None:
        """Write the given artifacts (kept if already there with the same content) and list
        them; take the records of artifacts the codec needs from other parts' fragments."""
        where = self.storage.describe("")
        union = load_manifest_or_fragments(self.storage, allow_incomplete=True,
                                           missing_ok=True, prefer_fragments=True)
        known = dict(union.artifacts) if union is not None else {}
        recorded = self.manifest.artifacts
        checked = {}
        for rel, data in given.items():   # every path checked before anything is written
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ConfigError(f"artifact {rel}: expected bytes, got {type(data).__name__}")
            checked[artifact_relpath(rel, "artifacts given to the writer")] = bytes(data)
        for rel, data in checked.items():
            digest = hashlib.sha256(data).hexdigest()
            listed = known.get(rel) or recorded.get(rel)
            if listed is not None and listed.get("sha256") != digest:
                raise ConfigError(
                    f"{where} already lists the artifact {rel} with sha256 "
                    f"{str(listed.get('sha256'))[:16]}..., this run's has {digest[:16]}... "
                    f"(codec side data fitted differently); use another --out or the same "
                    f"artifact")
            if self.storage.exists(rel):
                if self.storage.sha256(rel) != digest:
                    raise ConfigError(
                        f"{self.storage.describe(rel)} exists with other content than this "
                        f"run's artifact (sha256 {digest[:16]}...); use another --out, or "
                        f"delete the file if no part of this dataset has committed a shard")
            else:
                self.storage.write_bytes(rel, data)
            recorded[rel] = {"sha256": digest, "bytes": len(data)}
        for rel in sorted(_artifact_refs(codec)):
            rel = artifact_relpath(rel, "codec")
            if rel in recorded:
                continue
            if rel not in known:
                raise ConfigError(
                    f"codec {codec.name!r} needs the dataset artifact {rel}, which was neither "
                    f"given to the writer nor written by another part of {where}")
            recorded[rel] = dict(known[rel])

    @_io_guard
    def _clean_leftovers(self) -> None:
        """Remove what a killed writer of this part left: its temporary files and the shards
        its fragment does not list. Only names this part writes are touched, in the dataset's
        ``shards/`` and ``parts/``: other parts may be writing beside it, and a file under
        any other name (a user's) is not ours to delete."""
        shard_re = re.compile(rf"p{self.index:05d}-of-{self.count:05d}-\d{{6}}\.parquet")
        fragment = posixpath.basename(self.frag_rel)
        listed = {s.file for s in self.manifest.shards}
        for folder, ours in ((SHARDS_DIR, shard_re.fullmatch), (PARTS_DIR, fragment.__eq__)):
            for name in self.storage.listdir(folder):
                tmp = _TMP_RE.fullmatch(name)
                rel = f"{folder}/{name}"
                if (ours(tmp.group(1)) if tmp else
                        folder == SHARDS_DIR and ours(name) and rel not in listed):
                    self.storage.delete(rel)

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Commit on a normal exit, abort on an exception; shut the thread pools down."""
        try:
            if exc_type is None:
                self.end_window(commit=True)
            else:
                self.abort()
        finally:
            self.close()

    def close(self) -> None:
        """Shut the thread pools down (after the work queued on them)."""
        self._encoder.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True)

    @property
    def part(self) -> PartState:
        return self.manifest.parts[0]

    @property
    def next_record(self) -> int:
        return self.part.next_record

    @property
    def complete(self) -> bool:
        return self.part.complete

    # -- writing --------------------------------------------------------------------

    def _reset_shard(self) -> None:
        self._buf: dict[str, list] = {f.name: [] for f in self.schema}
        self._buf_bytes = 0
        self._shard_docs = self._shard_tokens = self._shard_rows = self._shard_bytes = 0
        self._shard_first: int | None = None     # input records the open shard covers
        self._shard_last = -1

    def _reset_window(self) -> None:
        self._pending = RecordCounts()
        self._last_record = -1

    @_io_guard
    def add_record(self, index: int, docs: list[TeacherDocument], *, skipped: str | None = None,
                   truncated: bool = False, split: bool = False) -> None:
        """Account for input record ``index`` (in input order) and write its documents."""
        if index < self.next_record or index <= self._last_record:
            raise DatasetError(f"record {index} arrives out of order (next expected after "
                               f"{max(self.next_record - 1, self._last_record)})")
        self._pending.read += 1
        if skipped is not None:
            self._pending.skip(skipped)
        else:
            self._pending.written += 1
            self._pending.truncated += int(truncated)
            self._pending.split += int(split)
        for doc in docs:
            self._check(doc)
        self._last_record = index
        self._queued.append((index, [(doc, self._encoder.submit(self._encode_topk, doc))
                                     for doc in docs]))
        if len(self._queued) >= QUEUED_RECORDS:
            self._append_queued()

    def _append_queued(self) -> None:
        """Append the queued records' documents in arrival order (top-k encoded by now); a
        shard that the last record filled is closed, to be listed at the window's end."""
        queued, self._queued = self._queued, []
        for index, record in queued:
            if self._shard_first is None:
                self._shard_first = index
            self._shard_last = index
            for doc, topk in record:
                self._append(doc, *topk.result())
            if (self.docs_per_shard and self._shard_docs >= self.docs_per_shard) or \
                    self._shard_bytes + self._buf_bytes >= self.shard_bytes:
                self._close_shard()
            elif self._buf_bytes >= self.row_group_bytes:
                self._write_row_group()

    @_io_guard
    def end_window(self, *, commit: bool = False) -> None:
        """A point where the caller may be resumed from. Lists the shards that filled during
        the window; with ``commit`` (or if one filled) the open shard is closed and listed
        too, so everything up to here survives a kill.

        The resume pointer moves only here, so a resumed run restarts on a boundary the
        caller chose (capture: its batching windows, committed at each one's end), and a
        shard's boundaries depend only on the records before it: resumed output is identical."""
        self._append_queued()
        if commit or self._closed:
            self._commit()

    def _check(self, doc: TeacherDocument) -> None:
        n = doc.num_teacher_rows
        if self.codec.signal == "sampled":
            if doc.sample_ids is None or doc.sample_counts is None:
                raise DatasetError(f"codec {self.codec.config.name!r} stores sampled teacher "
                                   f"rows, the document has none", row=doc.record_index,
                                   field="sample_ids")
            rows, field = doc.sample_ids.shape[0], "sample_ids"
        else:
            rows, field = doc.topk_ids.shape[0], "topk_ids"
        if rows != n:
            raise DatasetError(f"{rows} teacher rows for {n} flagged positions",
                               row=doc.record_index, field=field)
        missing = set(self.hidden_layers) - set(doc.hidden)
        if missing:
            raise DatasetError(f"hidden layers {sorted(missing)} missing", row=doc.record_index,
                               field="hidden")

    def _encode_topk(self, doc: TeacherDocument) -> tuple[bytes, bytes]:
        with self.times.time("encode_topk"):
            if self.codec.signal == "sampled":
                return self.codec.encode_samples(doc.sample_ids.numpy(),
                                                 doc.sample_counts.numpy())
            return self.codec.encode_rows(doc.topk_ids.numpy(), doc.topk_logprobs.numpy())

    def _append(self, doc: TeacherDocument, ids_b: bytes, vals_b: bytes) -> None:
        """Buffer one document; its hidden states are encoded here, in the caller's thread
        (and CUDA stream, when they are on a GPU)."""
        b = self._buf
        b[cols.DOC_ID].append(doc.doc_id)
        b[cols.NUM_TOKENS].append(doc.num_tokens)
        b[cols.INPUT_IDS].append(np.asarray(doc.input_ids, dtype=np.int32))
        b[cols.LOSS_MASK].append(None if doc.loss_mask is None else np.asarray(doc.loss_mask, bool))
        b[cols.TEACHER_MASK].append(None if doc.teacher_mask is None
                                    else np.asarray(doc.teacher_mask, bool))
        b[cols.TOPK_IDS].append(ids_b)
        b[cols.TOPK_VALUES].append(vals_b)
        size = len(ids_b) + len(vals_b) + 4 * doc.num_tokens
        for layer in self.hidden_layers:
            x = doc.hidden[layer]
            if isinstance(x, EncodedHidden):
                h = x.data
            else:
                with self.times.time("encode_hidden"):
                    h = self.codec.encode_hidden_array(x, layer)
            b[hidden_column(layer)].append(h)
            size += h.size
        self._buf_bytes += size
        self._shard_docs += 1
        self._shard_tokens += doc.num_tokens
        self._shard_rows += doc.num_teacher_rows

    def _write_row_group(self) -> None:
        if not self._buf[cols.DOC_ID]:
            return
        if self._pq is None:
            self._drain()
            self._stack = ExitStack()
            seq = len(self.manifest.shards) + len(self._closed)
            rel = shard_path(self.index, self.count, seq)
            self._sink = self._stack.enter_context(
                HashingWriter(self._stack.enter_context(self.storage.atomic_output(rel))))
            self._pq = pq.ParquetWriter(self._sink, self.schema, **self.parquet_options)
        arrays = [_binary_column(self._buf[f.name]) if f.name.startswith(cols.HIDDEN_PREFIX)
                  else pa.array(self._buf[f.name], type=f.type) for f in self.schema]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._drain()
        self._io_pending = self._io.submit(self._write_table, table)
        self._shard_bytes += self._buf_bytes
        self._buf = {f.name: [] for f in self.schema}
        self._buf_bytes = 0

    def _write_table(self, table: pa.Table) -> None:
        with self.times.time("parquet"):
            self._pq.write_table(table, row_group_size=len(table))

    def _drain(self) -> None:
        """Wait for the row group being written; its I/O error surfaces here."""
        pending, self._io_pending = self._io_pending, None
        if pending is not None:
            pending.result()

    def _close_shard(self) -> None:
        """Close the open shard (if any) under its final name; it is listed at the commit."""
        self._write_row_group()
        self._drain()
        if self._pq is not None:
            seq = len(self.manifest.shards) + len(self._closed)
            self._pq.close()
            self._stack.close()  # renames the temporary file into place
            self._pq = self._stack = None
            self._closed.append(ShardEntry(
                file=shard_path(self.index, self.count, seq), part=self.index, seq=seq,
                documents=self._shard_docs, tokens=self._shard_tokens,
                teacher_rows=self._shard_rows, bytes=self._sink.bytes,
                sha256=self._sink.sha256(), first_record=self._shard_first,
                last_record=self._shard_last))
        self._reset_shard()

    def _commit(self) -> None:
        """Close the open shard, list every closed one, and move the resume pointer."""
        self._append_queued()
        with self.times.time("commit"):
            self._close_shard()
            if self._last_record >= 0:
                self.manifest.shards.extend(self._closed)
                self.manifest.records.add(self._pending)
                self.part.next_record = self._last_record + 1
                self._save_fragment()
        self._closed = []
        self._reset_window()

    def _save_fragment(self) -> None:
        write_fragment(self.storage, self.frag_rel, self.manifest)

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file is removed, nothing is listed)."""
        wait([topk for _, record in self._queued for _, topk in record])
        self._queued = []
        self._closed = []     # closed but unlisted: removed as leftovers when reopened
        if self._io_pending is not None:
            wait([self._io_pending])           # never close the file under a write
            self._io_pending = None
        if self._stack is None:
            return
        try:
            self._pq.close()
        except (OSError, ValueError):  # the sink may already be gone
            pass
        try:
            err = RuntimeError("shard aborted")
            self._stack.__exit__(type(err), err, None)
        finally:
            self._pq = self._stack = None

    @_io_guard
    def finish(self) -> Manifest | None:
        """Commit the last shard, mark the part complete; returns the whole manifest if every
        part is now complete (and writes it), else None."""
        self._commit()
        if not self.part.complete:
            self.part.complete = True
            self._save_fragment()
        return write_manifest_if_complete(self.storage)


def _binary_column(values: list[np.ndarray]) -> pa.Array:
    """A large-binary column from per-row uint8 arrays: one copy into one buffer that Arrow
    takes as is. Hidden states are ~10 KB per token; building the column from Python bytes
    copied them twice more while holding the interpreter lock the teacher's forward needs."""
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum([v.size for v in values], out=offsets[1:])
    data = np.concatenate(values) if values else np.empty(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(values),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])
