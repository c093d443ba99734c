"""How the arrays a vLLM worker records (hidden states, top-k rows) reach the capture process.

Why: returned from ``collective_rpc``, they were serialized in the worker, sent through the
engine process and copied again on arrival: on an H200 a capture of AFM-4.5B with four
hidden layers (20 KB a token) ran at 0.15x of vLLM's prefill. Copied by the worker from its
own host buffers into shared memory after the window, then gathered per document, they still
crossed host memory twice (0.73x).

How, for workers on the capture process's host: before a window the capture process knows
how many tokens it submits, so it lays every array out in one shared-memory slot
(``SlotPool``) and names it in ``kdpipe_begin``. The worker maps the slot once (page-locked
on CUDA, ``SlotMaps``) and copies each forward step's rows straight from the device to their
place, asynchronously; it waits for its copies once, when the window is taken. The capture
process hands out views of the slot. A slot is reused only when no view handed out from it
is alive, so outputs stay valid for as long as anyone holds them. A slot's name is removed
as soon as the workers have mapped it: a killed capture leaves nothing in /dev/shm.

A worker on another host (multi-node tensor or pipeline parallelism) cannot map the slot: it
keeps its rows in host memory (``HostArrays``) and returns them in its reply, as
``[dtype, shape, bytes]`` (``to_wire``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import weakref

import numpy as np
import torch

from kdpipe.schemas import KdpipeError

_ALIGN = 64
SHM_DIR = "/dev/shm"       # where Linux keeps POSIX shared memory by name
_NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32,
          torch.float16: np.float16, torch.bfloat16: np.uint16}   # bf16 travels as its bits
_names = itertools.count()


def to_wire(t: torch.Tensor) -> list:
    """A CPU tensor as [dtype, shape, bytes]: plain msgpack types, no pickling needed."""
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return [str(t.dtype).removeprefix("torch."), list(t.shape), raw.numpy().tobytes()]


def from_wire(w) -> torch.Tensor:
    dtype, shape, data = w
    dt = getattr(torch, dtype)
    if not len(data):
        return torch.empty(tuple(shape), dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(tuple(shape))


def host_id() -> str:
    """This machine's identity: processes with the same one can share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _nbytes(dtype: str, shape: list) -> int:
    return int(np.prod(shape)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def layout(specs: dict[str, list]) -> tuple[dict[str, int], int]:
    """Each array's byte offset for ``specs`` (name -> [dtype, shape]), and the total size."""
    offsets, size = {}, 0
    for name, (dtype, shape) in specs.items():
        offsets[name] = size
        size += -(-_nbytes(dtype, shape) // _ALIGN) * _ALIGN
    return offsets, size


class SlotError(KdpipeError):
    """Shared memory for a window's arrays could not be set up."""


class Slot:
    """One shared-memory region of the capture process, laid out for one window's arrays."""

    def __init__(self, size: int) -> None:
        self.id = f"kdpipe-{os.getpid()}-{next(_names)}"
        self.size = size
        path = os.path.join(SHM_DIR, self.id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:   # reserve the pages now: a full /dev/shm is an error here, not a crash later
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise SlotError(f"{path}: cannot reserve {size / 2**20:.0f} MiB of shared "
                                f"memory for a window's arrays ({e.strerror}); free room in "
                                f"{SHM_DIR}, or capture fewer tokens per window "
                                f"(--window) or fewer hidden layers") from e
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.named = True
        self.specs: dict[str, list] = {}
        self.offsets: dict[str, int] = {}
        self._views: list[weakref.ref] = []

    def unlink(self) -> None:
        """Remove the slot's name (the mappings stay)."""
        if self.named:
            self.named = False
            try:
                os.unlink(os.path.join(SHM_DIR, self.id))
            except FileNotFoundError:
                pass

    def free(self) -> bool:
        """No array handed out from this slot is alive."""
        return all(r() is None for r in self._views)

    def array(self, name: str) -> torch.Tensor:
        """The array ``name`` of the current layout, as a tensor over the slot."""
        dtype, shape = self.specs[name]
        dt = getattr(torch, dtype)
        count = int(np.prod(shape))
        a = np.frombuffer(self.map, dtype=_NUMPY[dt], count=count, offset=self.offsets[name])
        self._views.append(weakref.ref(a))
        return torch.from_numpy(a).view(dt).view(tuple(shape))

    def close(self) -> None:
        self.unlink()
        try:
            self.map.close()
        except BufferError:   # a view still alive: the mapping goes with it
            pass


class SlotPool:
    """The capture process's slots: one per window in flight (a window's outputs may still be
    written while the next one runs), each reused once nothing of its window is alive."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []

    def acquire(self, specs: dict[str, list]) -> Slot:
        offsets, size = layout(specs)
        free = [s for s in self.slots if s.free()]
        slot = next((s for s in free if s.size >= size), None)
        if slot is None:
            for s in free:               # too small: replaced by one that fits
                s.close()
                self.slots.remove(s)
            slot = Slot(max(size * 5 // 4, 1 << 20))
            self.slots.append(slot)
        slot._views.clear()
        slot.specs, slot.offsets = dict(specs), offsets
        return slot

    def ids(self) -> list[str]:
        return [s.id for s in self.slots]

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.slots = []


class SlotMaps:
    """A worker's mappings of the capture process's slots, by slot id; page-locked on CUDA so
    that copies from the device into them are asynchronous."""

    def __init__(self) -> None:
        self.maps: dict[str, tuple[mmap.mmap, torch.Tensor, bool]] = {}

    def open(self, slot_id: str) -> tuple[torch.Tensor, bool]:
        """The slot as a uint8 tensor, mapped on first use, and whether it is page-locked
        (where the driver cannot lock it, copies go through page-locked staging)."""
        if slot_id not in self.maps:
            with open(os.path.join(SHM_DIR, slot_id), "r+b") as f:
                m = mmap.mmap(f.fileno(), 0)
            t = torch.frombuffer(m, dtype=torch.uint8)
            pinned = torch.cuda.is_available() and torch.cuda.is_initialized() and _page_lock(t)
            self.maps[slot_id] = (m, t, pinned)
        _, t, pinned = self.maps[slot_id]
        return t, pinned

    def keep(self, slot_ids: list[str]) -> None:
        """Forget the mappings of slots the capture process no longer has."""
        for slot_id in [s for s in self.maps if s not in slot_ids]:
            m, t, pinned = self.maps.pop(slot_id)
            if pinned:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            del t
            try:
                m.close()
            except BufferError:
                pass


def _page_lock(t: torch.Tensor) -> bool:
    """Register ``t``'s host memory with CUDA; False where the runtime refuses. The refusal
    stays in CUDA's last-error state, where torch's next kernel-launch check would report it
    as that kernel's failure: one launch here takes it off."""
    if int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)) == 0:
        return True
    try:
        torch.empty(1, device="cuda").zero_()
    except RuntimeError:
        pass
    return False


class SlotSink:
    """Where a worker on the capture process's host puts a window's rows: at their place in
    the slot, row ``row`` of array ``name`` onwards; rows past the layout are counted, not
    written (the capture process then refuses the window)."""

    def __init__(self, slot: tuple[torch.Tensor, bool], specs: dict[str, list],
                 offsets: dict[str, int]):
        (self.slot, self.pinned), self.specs, self.offsets = slot, specs, offsets
        self.rows: dict[str, int] = {}
        self.overflow: dict[str, int] = {}
        self._pending = False
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def put(self, name: str, t: torch.Tensor, row: int) -> None:
        n = int(t.shape[0])
        self.rows[name] = max(self.rows.get(name, 0), row + n)
        dtype, shape = self.specs[name]
        if row + n > shape[0]:
            self.overflow[name] = self.rows[name]
            return
        dt = getattr(torch, dtype)
        width = int(np.prod(shape[1:]))
        size = torch.empty(0, dtype=dt).element_size()
        start = self.offsets[name] + row * width * size
        dst = self.slot[start:start + n * width * size].view(dt).view(n, *shape[1:])
        if not t.is_cuda:
            dst.copy_(t)
            return
        self._pending = True
        if self.pinned:
            dst.copy_(t, non_blocking=True)    # casts on the device, then one copy
            return
        stage = torch.empty(dst.shape, dtype=dt, pin_memory=True)
        stage.copy_(t, non_blocking=True)
        self._staged.append((dst, stage))

    def ready(self) -> None:
        """Wait for the copies in flight (and move staged rows into the slot)."""
        if self._pending:
            torch.cuda.synchronize()
            self._pending = False
        for dst, stage in self._staged:
            dst.copy_(stage)
        self._staged = []


class HostArrays:
    """Where a worker on another host puts a window's rows: per-step host copies by name,
    joined and sent back in its reply."""

    def __init__(self, specs: dict[str, list]) -> None:
        self.specs = specs
        self.parts: dict[str, list[torch.Tensor]] = {}
        self._pending = False

    def put(self, name: str, t: torch.Tensor, row: int) -> None:
        """Keep a host copy of ``t`` (rows arrive in order, so ``row`` is implied); never
        waits for the device."""
        t = t.to(getattr(torch, self.specs[name][0]))
        if t.is_cuda:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
            self._pending = True
        else:
            out = t.clone()
        self.parts.setdefault(name, []).append(out)

    def ready(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            self._pending = False

    def wire(self) -> dict[str, list]:
        return {name: to_wire(torch.cat(parts)) for name, parts in self.parts.items()}
