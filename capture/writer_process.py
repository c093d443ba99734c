"""The capture's encoder and Parquet writer in a process of their own.

Why: encoding top-k rows and writing Parquet is host-side Python. In writer threads of the
teacher's process it contends with the forward loop for the interpreter lock, and on an H200
the whole capture of AFM-4.5B ran at 0.39-0.58x of a plain forward while its GPU side alone
ran at 0.94x. In a separate process the teacher's interpreter only launches the forward and
copies its results out.

How a window travels:

* The teacher's process encodes each document's hidden states on the GPU where the hidden
  codec can (``Codec.encode_hidden_tensor``: a few kernels, half the bytes to copy), then
  copies them, with the top-k rows (or the sampled ids and counts), into one of ``SLOTS``
  shared-memory buffers, page-locked on CUDA. The device-to-host copies run on a side CUDA
  stream that waits only for this window's forward, so they overlap the next window's.
  Hidden states already on the host are copied raw and encoded by the writer.
* Once the copies are done, a small message (record layout, offsets, input ids) goes to the
  writer process over a pipe. The writer maps the slot, feeds ``PartWriter`` exactly as the
  in-process path does (so the shards are byte-identical), commits the window, and answers
  with the part's progress and its stage seconds; the slot is then free.
* Back-pressure: at most ``SLOTS`` windows are staged or being written; the teacher waits for
  a free slot (its ``wait_writer`` seconds).

Failures: an error in the writer (a full disk, a failing store) comes back as the same
exception, and a writer that dies without one (killed) is reported as such, at the teacher's
next window boundary at the latest. The writer ignores SIGINT/SIGTERM (the teacher's process
decides when to stop); when the teacher's process closes the pipe without a ``close``, by an
error, a second Ctrl-C or its death, the writer aborts like ``PartWriter`` does on an
exception: the shard in progress is removed and only committed windows remain.
"""

from __future__ import annotations

import copy
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from kdpipe.compress import Codec, EncodedHidden, PartWriter
from kdpipe.runtime import StageTimes
from kdpipe.schemas import (ConfigError, DatasetError, KdpipeError, RecordCounts,
                            TeacherDocument)

from .backends import SequenceOutput

SLOTS = 3            # windows staged or being written at once: the memory bound
_ALIGN = 64
_ABORT = signal.SIGUSR1


@dataclass
class PartProgress:
    """What the teacher's side needs to know of the part the writer holds."""

    documents: int
    tokens: int
    bytes: int
    records: RecordCounts
    next_record: int
    complete: bool

    @classmethod
    def of(cls, writer: PartWriter) -> PartProgress:
        m = writer.manifest
        return cls(documents=m.documents, tokens=m.tokens, bytes=m.total_bytes,
                   records=copy.deepcopy(m.records), next_record=writer.next_record,
                   complete=writer.complete)


def write_window(prepared: list, outputs: list, writer: PartWriter, long_documents: str,
                 times: StageTimes, stream_ctx: AbstractContextManager) -> None:
    """Encode and commit one window, in record order (on the writer thread or process).

    ``prepared``: per record (index, skip reason | [(doc_id, ids, mask, output index)], cut?);
    ``outputs``: the teacher's ``SequenceOutput`` per sequence."""
    with times.time("write_window"), stream_ctx:
        for index, docs, cut in prepared:
            if isinstance(docs, str):
                writer.add_record(index, [], skipped=docs)
                continue
            tdocs = []
            for did, ids, mask, si in docs:
                out = outputs[si]
                # rows left on the GPU come out here, on the writer's stream, once the
                # window's forward is done (the encoders read them on the host)
                tdocs.append(TeacherDocument(doc_id=did, input_ids=ids,
                                             topk_ids=out.topk_ids.cpu(),
                                             topk_logprobs=out.topk_logprobs.cpu(), loss_mask=mask,
                                             hidden=out.hidden, record_index=index,
                                             sample_ids=_host(out.sample_ids),
                                             sample_counts=_host(out.sample_counts)))
            writer.add_record(index, tdocs, truncated=cut and long_documents == "truncate",
                              split=cut and long_documents == "split")
        writer.end_window(commit=True)   # every window is durable once written


def _host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


# -- the teacher's side ---------------------------------------------------------------------

class _Slot:
    """One window's shared-memory staging buffer; page-locked when ``pin`` (CUDA), so the
    device-to-host copies into it are asynchronous."""

    def __init__(self, size: int, pin: bool) -> None:
        _check_shared_memory(size)
        self.shm = SharedMemory(create=True, size=size)
        self.size = size
        self.tensor = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
        self.pinned = pin and torch.cuda.cudart().cudaHostRegister(
            self.tensor.data_ptr(), size, 0) == 0
        if pin and not self.pinned:
            warnings.warn("--writer process: the shared-memory slot could not be page-locked "
                          "(cudaHostRegister failed); device-to-host copies into it wait for "
                          "the GPU", RuntimeWarning, stacklevel=2)

    def release(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        self.tensor = None
        try:
            self.shm.close()
        except BufferError:   # a view still alive; the mapping goes with the process
            pass
        self.shm.unlink()


def _check_shared_memory(size: int) -> None:
    """Refuse a slot that /dev/shm cannot hold: past its size a write into the mapping kills
    the process with SIGBUS (containers often mount 64 MB there)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:      # no /dev/shm: SharedMemory uses what the platform has
        return
    free = st.f_bavail * st.f_frsize
    if free < size:
        raise ConfigError(
            f"--writer process: a window needs {size / 2**20:.0f} MiB of shared memory and "
            f"/dev/shm has {free / 2**20:.0f} MiB free; give it room for 3 windows (docker: "
            f"--ipc=host or --shm-size), or use smaller --window/--batch-tokens, or --writer "
            f"thread")


@dataclass
class _Staged:
    message: tuple
    done: torch.cuda.Event | None    # the copies' completion (None: copied synchronously)
    keep: list                       # device tensors the copies read, alive until done


class WriterProcess:
    """``PartWriter``'s role in a capture, played by a child process: opened with the
    writer's keyword arguments, it takes windows (``submit``), waits for them (``wait``),
    finishes the part (``finish``); as a context manager it closes the child on a normal exit
    and aborts it on an exception.

    ``progress``, ``next_record`` and ``complete`` are the part's state as of the last window
    the writer committed. The writer's stage seconds are added to ``times`` as they arrive,
    beside the teacher's own ``stage`` (encoding hidden states on the GPU and copying the
    window into shared memory) and ``wait_writer``."""

    def __init__(self, writer_args: dict, *, device: str, codec: Codec, long_documents: str,
                 times: StageTimes) -> None:
        self.codec, self.times = codec, times
        self.cuda = device.startswith("cuda")
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.where = writer_args["uri"]
        self.slots: list[_Slot | None] = [None] * SLOTS
        self.pending: deque[_Staged] = deque()   # staged, not yet sent
        self.in_flight = 0                       # sent, not yet committed
        self.windows = 0
        self._writer_seconds: dict[str, float] = {}
        # a fresh interpreter (never a fork of one holding a CUDA context, nor a re-run of the
        # caller's main module), in a session of its own: a terminal's Ctrl-C reaches only the
        # capture, which decides what the writer does
        inbox, to_writer = os.pipe()
        from_writer, outbox = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from kdpipe.capture.writer_process import main; main()",
             str(inbox), str(outbox)], pass_fds=(inbox, outbox), start_new_session=True)
        os.close(inbox)
        os.close(outbox)
        self._send, self._replies = Connection(to_writer, readable=False), \
            Connection(from_writer, writable=False)
        self.progress = PartProgress(0, 0, 0, RecordCounts(), 0, False)
        try:
            self._send_message((writer_args, long_documents))
            self.progress = self._expect("opened")[1]
        except BaseException:
            self._abort()
            raise

    @property
    def next_record(self) -> int:
        return self.progress.next_record

    @property
    def complete(self) -> bool:
        return self.progress.complete

    def __enter__(self) -> WriterProcess:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self.wait()
            self._send_message(("close",))
            self._expect("closed")
            self.proc.wait()
        except BaseException:
            self._abort()
            raise
        finally:
            self._release_slots()

    # -- windows --------------------------------------------------------------------

    def submit(self, prepared: list, outputs: list) -> None:
        """Stage a window (its forward queued or done) and hand it to the writer as soon as
        it is copied; waits while ``SLOTS`` windows are staged or being written."""
        self._collect()
        self._send_ready()
        with self.times.time("wait_writer"):
            while len(self.pending) + self.in_flight >= SLOTS:
                if self.in_flight:
                    self._expect("committed")
                else:
                    self._send_ready(block=True)
        with self.times.time("stage"):
            self.pending.append(self._stage(prepared, outputs))
        self._send_ready()

    def wait(self) -> None:
        """Block until every window handed in is committed; raise the writer's error."""
        with self.times.time("wait_writer"):
            self._send_ready(block=True)
            while self.in_flight:
                self._expect("committed")

    def finish(self) -> None:
        """Commit what is left, mark the part complete (and write manifest.json if every part
        is complete)."""
        self.wait()
        self._send_message(("finish",))
        self.progress = self._expect("finished")[1]

    def _stage(self, prepared: list, outputs: list[SequenceOutput]) -> _Staged:
        items: list[tuple[torch.Tensor, int]] = []
        size = 0

        def place(t: torch.Tensor, encoded: bool) -> tuple:
            nonlocal size
            t = t.detach().contiguous()
            spec = (size, str(t.dtype).removeprefix("torch."), tuple(t.shape), encoded)
            items.append((t, size))
            size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
            return spec

        encode_here = self.codec.hidden.encodes_on_device
        layout = []
        for out in outputs:
            hidden = {layer: place(self.codec.encode_hidden_tensor(x, layer), True)
                      if x.is_cuda and encode_here else place(x, False)
                      for layer, x in out.hidden.items()}
            samples = None if out.sample_ids is None else (place(out.sample_ids, False),
                                                           place(out.sample_counts, False))
            layout.append((place(out.topk_ids, False), place(out.topk_logprobs, False), hidden,
                           samples))
        index = self.windows % SLOTS
        self.windows += 1
        slot = self.slots[index]
        if slot is None or slot.size < size:
            if slot is not None:
                slot.release()
            slot = self.slots[index] = _Slot(max(size, 1 << 20) * 5 // 4, self.cuda)
        keep = [t for t, _ in items if t.is_cuda]
        done = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()     # after this window's forward and hidden-state encoding
            self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            for t, offset in items:
                n = t.numel() * t.element_size()
                if n:
                    slot.tensor[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8),
                                                         non_blocking=t.is_cuda)
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self.stream)
        message = ("window", index, slot.shm.name, prepared, layout)
        return _Staged(message, done, keep)

    def _send_ready(self, *, block: bool = False) -> None:
        """Send the staged windows whose copies are done, in order (all of them if ``block``)."""
        while self.pending:
            staged = self.pending[0]
            if staged.done is not None:
                if block:
                    staged.done.synchronize()
                elif not staged.done.query():
                    return
            self._send_message(staged.message)
            self.pending.popleft()
            self.in_flight += 1

    def _send_message(self, message: tuple) -> None:
        try:
            self._send.send(message)
        except (BrokenPipeError, ConnectionResetError):
            self._expect("")    # reads to the writer's error, or to its end: says it died
            raise

    # -- replies ----------------------------------------------------------------------

    def _collect(self) -> None:
        """Take the replies already there: raise a failure (or a dead writer) now."""
        while self._replies.poll():
            self._handle(self._receive())

    def _expect(self, kind: str) -> tuple:
        """Wait for the writer's next reply of ``kind`` (committed windows counted on the
        way); raise its error, or say that it died."""
        while True:
            message = self._receive()
            self._handle(message)
            if message[0] == kind:
                return message

    def _receive(self) -> tuple:
        """The next reply; the pipe's end (the writer gone without a word) is an error."""
        try:
            return self._replies.recv()
        except (EOFError, OSError):
            pass
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = ("closed its pipe" if code is None else
               f"was killed by {signal.Signals(-code).name}" if code < 0 else
               f"exited with status {code}")
        raise DatasetError(
            f"the capture's writer process {how}; windows committed before it are kept; "
            f"rerun the same command to resume from record {self.progress.next_record}",
            file=self.where)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "error":      # the writer exits after sending it
            raise pickle.loads(message[1])
        if kind in ("committed", "finished"):
            self.progress = message[1]
        if kind == "committed":
            self.in_flight -= 1
        if kind in ("committed", "finished", "closed"):
            seconds = message[-1]
            for stage, total in seconds.items():
                self.times.add(stage, total - self._writer_seconds.get(stage, 0.0))
            self._writer_seconds = seconds

    # -- teardown ---------------------------------------------------------------------

    def _abort(self) -> None:
        """Close the pipe (the writer aborts: removes the shard in progress, keeps what is
        committed) and wait for it to exit; kill it if it does not."""
        self._send.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._replies.close()
        self._release_slots()

    def _release_slots(self) -> None:
        for staged in self.pending:          # never unpin memory under a copy
            if staged.done is not None:
                staged.done.synchronize()
        self.pending.clear()
        for i, slot in enumerate(self.slots):
            if slot is not None:
                slot.release()
                self.slots[i] = None


# -- the writer's side ----------------------------------------------------------------------

class _Aborted(BaseException):
    """The teacher's side went away without closing: unwind, aborting the PartWriter."""


def _on_abort(signum, frame) -> None:
    raise _Aborted()


def main() -> None:
    """The writer process (``sys.argv``: its pipes' file descriptors): open the part, then
    write and commit windows until told to finish or close; any error goes back to the
    teacher's side as the exception itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(_ABORT, _on_abort)
    inbox = Connection(int(sys.argv[1]), writable=False)
    outbox = Connection(int(sys.argv[2]), readable=False)
    try:
        writer_args, long_documents = inbox.recv()
    except (EOFError, OSError):
        sys.exit(1)
    times = StageTimes()
    mapped: dict[int, SharedMemory] = {}
    messages: queue.Queue = queue.Queue()
    threading.Thread(target=_read_messages, args=(inbox, messages), daemon=True,
                     name="kdpipe-writer-inbox").start()
    try:
        with PartWriter(**writer_args, times=times) as writer:
            outbox.send(("opened", PartProgress.of(writer)))
            while True:
                message = messages.get()
                if message[0] == "window":
                    _, index, name, prepared, layout = message
                    outputs = _outputs(_mapped(mapped, index, name), layout)
                    write_window(prepared, outputs, writer, long_documents, times,
                                 nullcontext())
                    del outputs
                    outbox.send(("committed", PartProgress.of(writer), times.as_dict()))
                elif message[0] == "finish":
                    writer.finish()
                    outbox.send(("finished", PartProgress.of(writer), times.as_dict()))
                else:    # close
                    break
        outbox.send(("closed", times.as_dict()))
    except _Aborted:
        sys.exit(1)
    except BaseException as e:   # noqa: BLE001  (every failure goes back to the teacher's side)
        outbox.send(("error", _portable(e)))
        sys.exit(1)


def _read_messages(inbox: Connection, messages: queue.Queue) -> None:
    """Read the pipe as messages come (the teacher never blocks on a full pipe); on its end
    without a ``close``, interrupt the writer so that it aborts."""
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            os.kill(os.getpid(), _ABORT)
            return
        messages.put(message)
        if message[0] == "close":
            return


def _mapped(mapped: dict[int, SharedMemory], index: int, name: str) -> SharedMemory:
    shm = mapped.get(index)
    if shm is None or shm.name != name:     # the teacher's side grew this slot
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass
        shm = mapped[index] = SharedMemory(name=name)
        # the teacher's side owns it: this process's resource tracker must not unlink it
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    return shm


def _outputs(shm: SharedMemory, layout: list) -> list[SequenceOutput]:
    """The window's sequences as views of the slot (valid until its window is committed)."""
    def view(spec: tuple):
        offset, dtype, shape, encoded = spec
        dt = getattr(torch, dtype)
        n = int(np.prod(shape)) * torch.empty(0, dtype=dt).element_size()
        if encoded:
            return EncodedHidden(np.frombuffer(shm.buf, np.uint8, n, offset))
        if n == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(shm.buf, dtype=torch.uint8, count=n, offset=offset) \
            .view(dt).view(shape)

    return [SequenceOutput(view(ids), view(lps), {layer: view(s) for layer, s in hidden.items()},
                           *(() if samples is None else (view(samples[0]), view(samples[1]))))
            for ids, lps, hidden, samples in layout]


def _portable(e: BaseException) -> bytes:
    """The exception pickled as itself where it survives a round trip, else as a
    RuntimeError naming it; unexpected errors carry the writer's traceback as a note."""
    if not isinstance(e, KdpipeError):
        e.add_note("in the capture's writer process:\n" + "".join(
            traceback.format_exception(e)).rstrip())
    try:
        data = pickle.dumps(e)
        pickle.loads(data)
        return data
    except Exception:   # noqa: BLE001
        return pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
