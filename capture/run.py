"""The capture loop: records -> token sequences -> teacher forward -> encoded shards.

Work proceeds in windows of ``window`` records of this part, aligned to the part's
record numbering. Inside a window, sequences are sorted by length and batched under a
token budget; results are written back in record order, and every window is committed
at its end (its shard closed and listed; a shard also closes inside a window when it
reaches --shard-mb or --docs-per-shard). A stop or kill loses at most the windows in
flight; a resumed run starts on a window boundary and forms exactly the batches, and
the shard boundaries, an uninterrupted run formed, so its output is identical.

Windows are encoded and written by a writer process (``writer_process``; the default on
CUDA) or by a writer thread of this process (``--writer thread``; the default on the CPU),
which write the same bytes.

The run's seconds per stage (``CaptureSummary.stages``, printed by ``kdpipe capture``) are the
teacher's process's ``read``, ``tokenize``, ``forward`` (teacher forward, top-k, hidden states;
on a GPU the time to queue them, which the GPU then runs while the host goes on),
``stage`` (process writer only: hidden states encoded on the GPU, the window copied into
shared memory) and ``wait_writer``; the writer's ``write_window``, and inside it the
``PartWriter``'s ``encode_topk`` (summed over its encoder threads), ``encode_hidden``,
``parquet`` and ``commit``. They stay out of the dataset, whose bytes a resumed run reproduces.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from kdpipe.compress import (Codec, PartWriter, Storage, load_codec_config, needs_fitting,
                             sampling_of)
from kdpipe.compress.dense import HEAD_ARTIFACT
from kdpipe.runtime import Interrupted, StageTimes, StopSignals, resolve_device
from kdpipe.schemas import CaptureSettings, CodecConfig, ConfigError

from .backends import HFBackend, Sampling, TeacherBackend, parse_hidden_layers, resolve_dtype
from .inputs import (BadRecord, check_source, count_records, doc_id, iter_part,
                     source_identity, tokenize_record)
from .lock import PartLock
from .teacher import locate_model
from .writer_process import PartProgress, WriterProcess, write_window


# Hidden states a window keeps on the GPU for the writer to encode there (two windows are in
# flight); beyond this they go to host memory and are encoded on the CPU, more slowly.
HIDDEN_ON_DEVICE_BYTES = 8 << 30
DEFAULT_TOP_K = 128
REPORTED_BAD_RECORDS = 20
WRITERS = ("auto", "process", "thread")


@dataclass
class CaptureOptions:
    model: str
    data: str
    out: str
    backend: str = "hf"
    top_k: int | None = None   # None: the codec's top_k, else DEFAULT_TOP_K
    hidden_layers: str = "none"
    hidden_source: str = "residual"   # residual | attention (schemas CaptureSettings)
    max_seq_len: int = 2048
    dtype: str = "auto"
    device: str = "auto"
    chat_template: bool = True
    text_field: str = "text"
    split: str = "train"
    long_documents: str = "truncate"
    limit: int | None = None
    num_shards: int = 1
    shard_index: int = 0
    codec: str = "exact"
    batch_tokens: int = 8192
    window: int = 64
    docs_per_shard: int = 0
    shard_mb: float = 512.0
    trust_remote_code: bool = False
    progress: bool = True
    writer: str = "auto"       # process | thread | auto: the process on CUDA, else the thread
    # --backend vllm only: VLLMBackend keyword arguments (tensor_parallel_size, ...)
    vllm_options: dict = field(default_factory=dict)


@dataclass
class CaptureSummary:
    out: str
    documents: int
    tokens: int
    bytes: int
    seconds: float
    complete: bool
    skipped: dict[str, int]
    records: int = 0                # input records of this part committed (read)
    stopped_by: int | None = None   # the signal that stopped the capture, if one did
    stages: dict[str, float] = field(default_factory=dict)   # seconds per stage (see above)
    # per window handed to the writer: (seconds since processing began, tokens)
    windows: list[tuple[float, int]] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def tokens_in_run(self) -> int:
        """Tokens this run processed (``tokens`` also counts those of a resumed run's past)."""
        return sum(n for _, n in self.windows)


def make_backend(opts: CaptureOptions, model_path: str, device: str, dtype: str,
                 layers: list[int]) -> TeacherBackend:
    """The teacher backend ``opts`` asks for, loaded (the caller closes it)."""
    if opts.backend == "hf":
        sampling = sampling_of(load_codec_config(opts.codec))
        return HFBackend(model_path, device=device, dtype=dtype, top_k=opts.top_k,
                         hidden_layers=layers, trust_remote_code=opts.trust_remote_code,
                         hidden_source=opts.hidden_source,
                         sampling=None if sampling is None else Sampling(*sampling))
    if opts.backend == "vllm":
        if opts.hidden_source != "residual" and layers:
            raise ConfigError(f"--hidden-source {opts.hidden_source}: the vllm backend "
                              f"captures layer outputs only; use --backend hf for attention "
                              f"block outputs")
        from .vllm_backend import VLLMBackend  # imports vllm only here
        return VLLMBackend(model_path, device=device, dtype=dtype, top_k=opts.top_k,
                           hidden_layers=layers, trust_remote_code=opts.trust_remote_code,
                           max_seq_len=opts.max_seq_len, max_num_batched_tokens=opts.batch_tokens,
                           **opts.vllm_options)
    raise ConfigError(f"--backend {opts.backend!r}: available backends: hf, vllm")


def _pieces(ids: np.ndarray, mask, max_len: int, mode: str):
    """Split or truncate a long sequence; returns [(ids, mask)] and whether it was cut."""
    if len(ids) <= max_len:
        return [(ids, mask)], False
    if mode == "truncate":
        return [(ids[:max_len], None if mask is None else mask[:max_len])], True
    return [(ids[s:s + max_len], None if mask is None else mask[s:s + max_len])
            for s in range(0, len(ids), max_len)], True


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped longest-first so that batch size x longest length <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > budget:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def _say(message: str) -> None:
    """A line on stderr that leaves the progress bar intact."""
    tqdm.write(f"kdpipe capture: {message}", file=sys.stderr)


@contextmanager
def _output(out: str, index: int, count: int):
    """Check a local --out (create it if needed, prove it writable) and hold the part's lock;
    a directory this run created and left empty is removed again."""
    storage = Storage(out)
    if not storage.local:
        yield    # object stores: no lock (see capture/lock.py)
        return
    root = Path(storage.root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror or e})") from e
    try:
        with PartLock(str(root), index, count, _say):
            yield
    finally:
        if created and not any(root.iterdir()):
            root.rmdir()


def _part_records(n: int, count: int, index: int) -> int:
    """How many of the records 0..n-1 belong to part ``index`` of ``count``."""
    return max(0, (n - index + count - 1) // count)


def _check_options(opts: CaptureOptions) -> tuple[CaptureOptions, object]:
    if opts.long_documents not in ("truncate", "split"):
        raise ConfigError(f"--long-documents {opts.long_documents!r}: use truncate or split")
    if opts.backend not in ("hf", "vllm"):
        raise ConfigError(f"--backend {opts.backend!r}: available backends: hf, vllm")
    if opts.writer not in WRITERS:
        raise ConfigError(f"--writer {opts.writer!r}: use {', '.join(WRITERS)}")
    if opts.backend == "hf" and opts.vllm_options:
        raise ConfigError(f"{sorted(opts.vllm_options)}: vLLM options need --backend vllm")
    codec_cfg = load_codec_config(opts.codec)
    sampling = sampling_of(codec_cfg)
    if sampling is not None:   # the rows' width is the number of draws
        if opts.backend != "hf":
            raise ConfigError(f"--codec {opts.codec}: the sampled teacher signal is drawn by "
                              f"the hf backend only; use --backend hf")
        if opts.top_k is not None and opts.top_k != sampling[0]:
            raise ConfigError(f"--top-k {opts.top_k}: --codec {opts.codec} samples "
                              f"{sampling[0]} ids per position and keeps no top-k; leave "
                              f"--top-k out")
        opts = replace(opts, top_k=sampling[0])
    if codec_cfg.dense and opts.backend != "hf":
        raise ConfigError(f"--codec {opts.codec}: dense codecs need the teacher's last layer, "
                          f"final norm and LM head, which only --backend hf provides")
    if opts.top_k is None:   # the teacher computes no more log-probs than the codec keeps
        opts = replace(opts, top_k=codec_cfg.top_k or DEFAULT_TOP_K)
    if opts.max_seq_len < 1 or opts.top_k < 1 or opts.window < 1:
        raise ConfigError("--max-seq-len, --top-k and --window must be positive")
    if needs_fitting(codec_cfg):
        raise ConfigError(f"--codec {opts.codec}: the {codec_cfg.hidden.kind} hidden codec fits "
                          f"its side data on captured hidden states, so capture cannot write it; "
                          f"capture with --codec exact (or default), then run `kdpipe compress "
                          f"CAPTURED OUT --codec {opts.codec}`")
    return opts, codec_cfg


def run_capture(opts: CaptureOptions, *, backend: TeacherBackend | None = None
                ) -> CaptureSummary:
    """Capture one part. Everything cheap (options, input, teacher path, --out, the part's
    lock) is checked before the teacher loads. A stop by signal returns a summary with
    ``stopped_by`` set once windows run; before that it raises Interrupted.

    ``backend``: a teacher already loaded for these options (``make_backend``), which the
    caller keeps and closes, e.g. to capture several datasets with one engine; by default the
    run loads its own and closes it."""
    opts, codec_cfg = _check_options(opts)
    check_source(opts.data)
    model_path, model_id = locate_model(opts.model, _say)
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_path,
                                            trust_remote_code=opts.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {opts.model}: cannot read its configuration: {e}") from e
    layers = parse_hidden_layers(opts.hidden_layers, config.num_hidden_layers,
                                 source=opts.hidden_source)
    if codec_cfg.dense:   # the full distribution is rebuilt from the last layer's output
        if opts.hidden_source != "residual":
            raise ConfigError(f"--codec {codec_cfg.name} rebuilds the teacher's distribution from "
                              f"its last layer's output: it needs --hidden-source residual")
        layers = sorted(set(layers) | {config.num_hidden_layers})
    vocab = getattr(config, "vocab_size", None)
    if vocab and opts.top_k > vocab:
        raise ConfigError(f"--top-k {opts.top_k} exceeds the teacher's vocabulary ({vocab})")
    try:
        device = str(resolve_device(opts.device))
    except ValueError as e:
        raise ConfigError(f"--device {e}") from e
    dtype = resolve_dtype(opts.dtype, device)
    data_id, data_fp = source_identity(opts.data)
    settings = CaptureSettings(
        backend=opts.backend, top_k=opts.top_k, max_seq_len=opts.max_seq_len, dtype=dtype,
        chat_template=opts.chat_template, hidden_layers=layers, text_field=opts.text_field,
        long_documents=opts.long_documents, data_source=data_id, num_shards=opts.num_shards,
        limit=opts.limit, data_fingerprint=data_fp, hidden_source=opts.hidden_source)
    counted = count_records(opts.data)
    n = opts.limit if counted is None else min(counted, opts.limit or counted)
    total = None if n is None else _part_records(n, opts.num_shards, opts.shard_index)
    part = f" (part {opts.shard_index} of {opts.num_shards})" if opts.num_shards > 1 else ""
    _say(f"backend {opts.backend}, device {device}, dtype {dtype}, top-k {opts.top_k}, "
         f"hidden layers {','.join(map(str, layers)) or 'none'}, codec {codec_cfg.name}, "
         f"records to read: {'unknown' if total is None else total}{part}; loading the teacher")
    notice = (lambda sig: _say(f"{sig.name}: finishing the current window, then stopping; "
                               f"Ctrl-C again to abort it"))
    with StopSignals(notice=notice) as stop, _output(opts.out, opts.shard_index,
                                                     opts.num_shards):
        teacher = backend if backend is not None else make_backend(opts, model_path, device,
                                                                    dtype, layers)
        sampling = sampling_of(codec_cfg)
        if getattr(teacher, "sampling", None) != (None if sampling is None
                                                  else Sampling(*sampling)):
            raise ConfigError(f"--codec {opts.codec}: the teacher backend given draws "
                              f"{getattr(teacher, 'sampling', None)}, the codec asks for "
                              f"{sampling or 'top-k rows'}")
        try:
            captures = getattr(teacher, "hidden_source", "residual")
            if layers and captures != opts.hidden_source:
                raise ConfigError(f"--hidden-source {opts.hidden_source}: the {teacher.name} "
                                  f"backend given captures {captures} hidden states")
            return _capture_part(opts, teacher, settings, codec_cfg, model_id, dtype, device,
                                 stop, total)
        finally:
            if backend is None:
                teacher.close()


def _capture_part(opts: CaptureOptions, backend: TeacherBackend, settings: CaptureSettings,
                  codec_cfg: CodecConfig, model_id: str, dtype: str, device: str, stop: StopSignals,
                  total: int | None) -> CaptureSummary:
    """Open the part's writer and capture what is left of the part (nothing if complete)."""
    times = StageTimes()
    windows: list[tuple[float, int]] = []
    teacher = backend.teacher_info(model_id, dtype)
    artifacts = None
    if codec_cfg.dense:
        if not hasattr(backend, "head_artifact"):
            raise ConfigError(f"--codec {codec_cfg.name}: the {backend.name} backend cannot "
                              f"provide the teacher head a dense codec ships")
        artifacts = {HEAD_ARTIFACT: backend.head_artifact()}
    args = dict(uri=opts.out, teacher=teacher, capture=settings, codec=codec_cfg,
                index=opts.shard_index, count=opts.num_shards, docs_per_shard=opts.docs_per_shard,
                shard_bytes=int(opts.shard_mb * (1 << 20)), artifacts=artifacts)
    if opts.writer == "process" or (opts.writer == "auto" and device.startswith("cuda")):
        # the teacher's side encodes hidden states on the GPU: a codec without side data
        codec = Codec(codec_cfg, vocab_size=teacher.vocab_size, top_k=settings.top_k,
                      hidden_size=teacher.hidden_size, hidden_dtype=teacher.dtype)
        open_writer = lambda: WriterProcess(args, device=device, codec=codec,  # noqa: E731
                                            long_documents=opts.long_documents, times=times)
    else:
        open_writer = lambda: PartWriter(**args, times=times)  # noqa: E731
    t0 = time.time()
    try:
        with open_writer() as writer:
            if writer.complete:
                writer.finish()  # writes manifest.json if other parts finished meanwhile
                return _summary(opts, writer, time.time(), times, windows)
            t0 = time.time()  # throughput counts processing, not model loading
            _capture_records(opts, backend, writer, device, stop, total, times, windows)
    except Interrupted as e:
        if not stop.graceful:   # before the first window: nothing new was written
            raise
        return _summary(opts, writer, t0, times, windows,
                        stopped_by=e.signum)   # the writer aborted
    return _summary(opts, writer, t0, times, windows,
                    stopped_by=None if writer.complete else stop.signum)


T = TypeVar("T")


def _timed(items: Iterable[T], times: StageTimes, stage: str) -> Iterator[T]:
    """``items``, with the time spent producing each one added to ``stage``."""
    it = iter(items)
    while True:
        with times.time(stage):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def _capture_records(opts: CaptureOptions, backend: TeacherBackend,
                     writer: PartWriter | WriterProcess, device: str, stop: StopSignals,
                     total: int | None, times: StageTimes,
                     windows: list[tuple[float, int]]) -> None:
    """Run the windows from the part's resume point; commit each; finish the part unless
    stopped. A part that wrote no document is an error that says why. ``windows`` receives
    (time.time(), tokens) of every window as it is handed to the writer."""
    start = writer.next_record
    records = iter_part(opts.data, text_field=opts.text_field, num_parts=opts.num_shards,
                        part=opts.shard_index, start=start, limit=opts.limit, split=opts.split)
    done = _part_records(start, opts.num_shards, opts.shard_index)
    bar = tqdm(disable=not opts.progress, unit="rec", desc=f"capture part {opts.shard_index}",
               total=total, initial=done, dynamic_ncols=True)
    t0 = time.time()
    stop.graceful = True
    tokens_done = bad = 0
    window: list[tuple[int, object]] = []
    writes = (nullcontext(writer) if isinstance(writer, WriterProcess)
              else _BackgroundWrites(writer, opts, device, times))
    # the next window is tokenized on a thread while this one's forward runs: on a GPU the
    # forward's thread mostly waits for the device, with the interpreter lock released
    ready: Future | None = None      # the window tokenized ahead, not yet run
    with bar, writes as writes, \
            ThreadPoolExecutor(1, thread_name_prefix="kdpipe-tokenize") as tokenizer:
        for index, rec in _timed(records, times, "read"):
            window.append((index, rec))
            if isinstance(rec, BadRecord) and rec.where:   # name the first few
                bad += 1
                if bad <= REPORTED_BAD_RECORDS:
                    _say(f"{rec.where}: {rec.reason}; record skipped")
            if (index // opts.num_shards + 1) % opts.window:
                continue
            ahead = tokenizer.submit(_tokenize_window, window, backend, opts, times)
            window = []
            if ready is not None:
                tokens_done += _submit(ready.result(), backend, opts, writes, bar, times,
                                       windows)
                bar.set_postfix(tok_s=f"{tokens_done / max(time.time() - t0, 1e-9):.0f}")
            ready = ahead
            if stop.signum is not None:     # the window tokenized ahead is not run
                writes.wait()
                return
        if ready is not None:
            _submit(ready.result(), backend, opts, writes, bar, times, windows)
        if window:      # the part's last, partial window
            _submit(_tokenize_window(window, backend, opts, times), backend, opts, writes, bar,
                    times, windows)
        writes.wait()
        progress = _progress(writer)
        if progress.documents == 0 and (opts.num_shards == 1 or progress.records.read):
            raise ConfigError(_nothing_written(opts, progress))
        writer.finish()


def _submit(tokenized: _Tokenized, backend: TeacherBackend, opts: CaptureOptions,
            writes: _BackgroundWrites | WriterProcess, bar, times: StageTimes,
            windows: list[tuple[float, int]]) -> int:
    outputs, tokens = _forward_window(tokenized, backend, opts, times)
    writes.submit(tokenized.prepared, outputs)
    windows.append((time.time(), tokens))
    bar.update(tokenized.records)
    return tokens


def _progress(writer: PartWriter | WriterProcess) -> PartProgress:
    return writer.progress if isinstance(writer, WriterProcess) else PartProgress.of(writer)


def _nothing_written(opts: CaptureOptions, progress: PartProgress) -> str:
    counts = progress.records
    if not counts.read:
        return f"--data {opts.data}: no input records to capture; nothing was written"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counts.skipped.items()))
    return (f"--data {opts.data}: all {counts.read} records were skipped ({reasons}); "
            f"nothing was written (wrong --text-field, or --no-chat-template on chat data?)")


class _BackgroundWrites:
    """``--writer thread``: encodes and commits windows on one background thread of this
    process, in order, one window at a time: the encoding and Parquet writes of window w
    overlap the teacher forward of window w + 1 (and contend with it for the interpreter lock,
    which costs little when the forward runs on the CPU, and much on a fast GPU)."""

    def __init__(self, writer: PartWriter, opts: CaptureOptions, device: str,
                 times: StageTimes) -> None:
        self.writer, self.opts, self.times = writer, opts, times
        self.stream = _WriterStream(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdpipe-write")
        self.pending: Future | None = None

    def __enter__(self) -> _BackgroundWrites:
        return self

    def __exit__(self, *exc) -> None:
        """Waits for the window being written: the caller's writer is never aborted (on an
        error) under a write in flight."""
        self.pool.shutdown(wait=True)

    def submit(self, prepared: list, outputs: list) -> None:
        self.wait()
        self.pending = self.pool.submit(write_window, prepared, outputs, self.writer,
                                        self.opts.long_documents, self.times,
                                        self.stream.handoff())

    def wait(self) -> None:
        """Block until the previous window is written; re-raise its error in this thread."""
        if self.pending is not None:
            with self.times.time("wait_writer"):
                self.pending.result()


@dataclass
class _Tokenized:
    """A window ready for the teacher: per record (index, skip reason | [(doc_id, ids, mask,
    sequence)], cut?), and the sequences with their document ids."""

    prepared: list
    seqs: list
    seq_ids: list
    records: int


def _tokenize_window(window: list, backend: TeacherBackend, opts: CaptureOptions,
                     times: StageTimes) -> _Tokenized:
    """Tokenize a window's records and cut them into the teacher's sequences."""
    prepared = []
    seqs, seq_ids = [], []
    for index, rec in window:
        if isinstance(rec, BadRecord):
            prepared.append((index, rec.reason, False))
            continue
        with times.time("tokenize"):
            tokd = tokenize_record(rec, backend.tokenizer, text_field=opts.text_field,
                                   chat_template=opts.chat_template)
        if isinstance(tokd, BadRecord):
            prepared.append((index, tokd.reason, False))
            continue
        pieces, cut = _pieces(tokd.input_ids, tokd.loss_mask, opts.max_seq_len,
                              opts.long_documents)
        base = doc_id(index, rec, opts.text_field)
        docs = []
        for j, (ids, mask) in enumerate(pieces):
            docs.append((base if len(pieces) == 1 else f"{base}-c{j:04d}", ids, mask, len(seqs)))
            seqs.append(ids)
            seq_ids.append(docs[-1][0])
        prepared.append((index, docs, cut))
    return _Tokenized(prepared, seqs, seq_ids, len(window))


def _forward_window(tokenized: _Tokenized, backend: TeacherBackend, opts: CaptureOptions,
                    times: StageTimes) -> tuple[list, int]:
    """Run a tokenized window through the teacher: the backend's output per sequence, and
    the number of tokens."""
    seqs, seq_ids = tokenized.seqs, tokenized.seq_ids
    outputs = [None] * len(seqs)
    # a backend with its own scheduler (vLLM) takes the whole window at once
    groups = ([list(range(len(seqs)))] if seqs and backend.schedules_batches
              else _batches([len(s) for s in seqs], opts.batch_tokens))
    on_device = 0
    for batch in groups:
        with times.time("forward"):
            results = (backend.forward_batch([seqs[i] for i in batch],
                                             doc_ids=[seq_ids[i] for i in batch])
                       if getattr(backend, "sampling", None) is not None
                       else backend.forward_batch([seqs[i] for i in batch]))
        for i, res in zip(batch, results):
            size = sum(t.numel() * t.element_size() for t in res.hidden.values() if t.is_cuda)
            if on_device + size > HIDDEN_ON_DEVICE_BYTES:   # e.g. every layer of a big teacher
                res.hidden = {layer: t.cpu() for layer, t in res.hidden.items()}
            else:
                on_device += size
            outputs[i] = res
    return outputs, sum(len(s) for s in seqs)


class _WriterStream:
    """The writer thread's own CUDA stream. Encoding hidden states on the GPU there, and copying
    them out, waits only for the window it writes (an event recorded after that window's
    forward), never for the next window's forward queued meanwhile on the default stream."""

    def __init__(self, device: str) -> None:
        self.stream = torch.cuda.Stream(device) if device.startswith("cuda") else None

    def handoff(self):
        """Called on the main thread once a window's forward is queued."""
        if self.stream is None:
            return nullcontext()
        ready = torch.cuda.Event()
        ready.record()
        return self._after(ready)

    @contextmanager
    def _after(self, ready):
        self.stream.wait_event(ready)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            self.stream.synchronize()    # the window's GPU tensors are released after this


def _summary(opts: CaptureOptions, writer: PartWriter | WriterProcess, t0: float,
             times: StageTimes, windows: list[tuple[float, int]],
             stopped_by: int | None = None) -> CaptureSummary:
    p = _progress(writer)
    return CaptureSummary(out=opts.out, documents=p.documents, tokens=p.tokens, bytes=p.bytes,
                          seconds=time.time() - t0, complete=p.complete,
                          skipped=dict(p.records.skipped), records=p.records.read,
                          stopped_by=stopped_by, stages=times.as_dict(),
                          windows=[(t - t0, n) for t, n in windows])

