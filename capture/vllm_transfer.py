"""How the arrays a vLLM worker records (hidden states, top-k rows) reach the capture process.

Why: returned from ``collective_rpc``, they were serialized in the worker, sent through the
engine process and copied again on arrival: on an H200 a capture of AFM-4.5B with four
hidden layers (20 KB a token) ran at 0.15x of vLLM's prefill, against 0.66x without them.

How:

* While it records, a worker copies each step's arrays to host memory, asynchronously into
  page-locked buffers on CUDA (vLLM reuses its device buffers; a synchronous copy would stall
  every forward step), and waits for the copies once, when asked for them (``HostArrays``).
* ``kdpipe_take`` answers with the arrays' names, dtypes and shapes only. The capture process
  lays them out in one shared-memory slot of its own (``SharedSlot``, grown as needed, kept
  across windows) and ``kdpipe_write`` has every worker copy its arrays there; the capture
  process reads them as views of the slot.
* A worker on another host (multi-node tensor or pipeline parallelism) cannot map that slot:
  it returns its arrays in the reply instead, as ``[dtype, shape, bytes]`` (``to_wire``).
"""

from __future__ import annotations

import mmap
import os
import socket
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

_ALIGN = 64
SHM_DIR = "/dev/shm"       # where Linux keeps POSIX shared memory by name


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


class HostArrays:
    """A worker's recorded arrays by name, each a list of per-step host tensors."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self._pending = False

    def add(self, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Keep a host copy of ``t`` (as ``dtype``) under ``name``; never waits for the device."""
        dtype = dtype or t.dtype
        if t.is_cuda:
            t = t.to(dtype)                     # cast on the device, copy as is
            out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
            self._pending = True
        else:
            out = t.to(dtype, copy=True)
        self.parts.setdefault(name, []).append(out)

    def ready(self) -> None:
        """Wait for the copies in flight."""
        if self._pending:
            torch.cuda.synchronize()
            self._pending = False

    def specs(self) -> dict[str, list]:
        """name -> [dtype, shape] of the arrays the parts make when joined."""
        out = {}
        for name, parts in self.parts.items():
            shape = list(parts[0].shape)
            shape[0] = sum(int(p.shape[0]) for p in parts)
            out[name] = [str(parts[0].dtype).removeprefix("torch."), shape]
        return out

    def joined(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name])

    def write(self, slot_name: str, offsets: dict[str, int]) -> None:
        """Copy every array into the capture process's slot at its offset. The slot is mapped
        as a file, outside ``SharedMemory``: its resource tracker, which vLLM's processes may
        share with the capture process, would otherwise count this mapping as an owner."""
        with open(os.path.join(SHM_DIR, slot_name), "r+b") as f:
            buf = mmap.mmap(f.fileno(), 0)
        try:
            for name, offset in offsets.items():
                for part in self.parts[name]:
                    raw = part.contiguous().reshape(-1).view(torch.uint8)
                    n = raw.numel()
                    if n:
                        torch.frombuffer(buf, dtype=torch.uint8, count=n,
                                         offset=offset).copy_(raw)
                    offset += n
        finally:
            try:
                buf.close()
            except BufferError:   # a view still alive; the mapping goes with the process
                pass


class SharedSlot:
    """The capture process's shared-memory slot for the workers' arrays, grown as needed and
    removed at ``close``."""

    def __init__(self) -> None:
        self.shm: SharedMemory | None = None

    def layout(self, specs: dict[str, list]) -> tuple[str, dict[str, int]]:
        """Room for every array of ``specs`` (name -> [dtype, shape]): the slot's name and each
        array's offset."""
        offsets, size = {}, 0
        for name, (dtype, shape) in specs.items():
            offsets[name] = size
            size += -(-_nbytes(dtype, shape) // _ALIGN) * _ALIGN
        if self.shm is None or self.shm.size < size:
            self.close()
            self.shm = SharedMemory(create=True, size=max(size * 5 // 4, 1 << 20))
        return self.shm.name, offsets

    def view(self, dtype: str, shape: list, offset: int) -> torch.Tensor:
        """An array the workers wrote, as a tensor over the slot (valid until the next
        ``layout``)."""
        dt = getattr(torch, dtype)
        n = _nbytes(dtype, shape)
        if n == 0:
            return torch.empty(tuple(shape), dtype=dt)
        return torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=n, offset=offset) \
            .view(dt).view(tuple(shape))

    def close(self) -> None:
        if self.shm is None:
            return
        try:
            self.shm.close()
        except BufferError:   # a view still alive; the mapping goes with the process
            pass
        self.shm.unlink()
        self.shm = None


def _nbytes(dtype: str, shape: list) -> int:
    return int(np.prod(shape)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def fetch(payloads: list[dict], write, slot: SharedSlot) -> list[dict[str, torch.Tensor]]:
    """The arrays of every worker's ``kdpipe_take`` reply, by name: read from ``slot`` after
    ``write(slot_name, plan)`` (``kdpipe_write`` on every worker) for the workers on this
    host, from the reply itself for the others."""
    here = host_id()
    plan, specs = {}, {}
    for p in payloads:
        if p["host"] == here and p["arrays"]:
            for name, spec in p["arrays"].items():
                specs[f"{p['rank']}:{name}"] = spec
    if specs:
        slot_name, offsets = slot.layout(specs)
        for key, offset in offsets.items():
            rank, name = key.split(":", 1)
            plan.setdefault(rank, {})[name] = offset
        write(slot_name, plan)
    out = []
    for p in payloads:
        if p["wire"] is not None:
            out.append({name: from_wire(w) for name, w in p["wire"].items()})
        else:
            out.append({name: slot.view(*spec, plan[p["rank"]][name])
                        for name, spec in p["arrays"].items()})
    return out

