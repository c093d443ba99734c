"""How a vLLM worker's rows reach the capture process (``capture/vllm_transfer.py``), without
vLLM: the worker's side runs in this process on the same slot the capture process hands out."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from kdpipe.capture import vllm_transfer
from kdpipe.capture.vllm_transfer import (HostArrays, SlotError, SlotMaps, SlotPool, SlotSink,
                                          from_wire)

SPECS = {"ids": ["int32", [6]], "hidden.3": ["bfloat16", [6, 5]],
         "topk_lps": ["float32", [6, 4]]}


def _window(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 1000, (6,), generator=g, dtype=torch.int64).to(device),
            "hidden.3": torch.randn(6, 5, generator=g).to(torch.bfloat16).to(device),
            "topk_lps": torch.randn(6, 4, generator=g).to(device)}


def _record(pool: SlotPool, maps: SlotMaps, rows: dict[str, torch.Tensor], steps=(2, 0, 4)):
    """One window as the worker records it: each forward step's rows at their offset."""
    slot = pool.acquire(SPECS)
    sink = SlotSink(maps.open(slot.id), slot.specs, slot.offsets)
    slot.unlink()
    row = 0
    for n in steps:
        for name, t in rows.items():
            sink.put(name, t[row:row + n], row)
        row += n
    sink.ready()
    return slot, sink


def test_rows_land_in_place_and_outputs_outlive_later_windows():
    pool, maps = SlotPool(), SlotMaps()
    first = _window(0)
    slot, sink = _record(pool, maps, first)
    assert sink.rows == {name: 6 for name in SPECS} and not sink.overflow
    held = {name: slot.array(name)[1:5] for name in SPECS}   # outputs are views of the slot
    for name, t in held.items():
        assert torch.equal(t, first[name][1:5].to(t.dtype))
    # the next window cannot reuse the slot while those views live, so they stay intact
    second_slot, _ = _record(pool, maps, _window(1))
    assert second_slot is not slot
    for name, t in held.items():
        assert torch.equal(t, first[name][1:5].to(t.dtype))
    del held, t
    third_slot, _ = _record(pool, maps, _window(2))
    assert third_slot is slot                 # freed: reused, no new shared memory
    assert not [f for f in os.listdir(vllm_transfer.SHM_DIR) if f in pool.ids()]
    maps.keep([])
    pool.close()


def test_rows_past_the_layout_are_counted_not_written():
    pool, maps = SlotPool(), SlotMaps()
    slot = pool.acquire(SPECS)
    sink = SlotSink(maps.open(slot.id), slot.specs, slot.offsets)
    sink.put("ids", torch.arange(6), 0)
    sink.put("ids", torch.full((3,), 7), 6)
    assert sink.rows["ids"] == 9 and sink.overflow == {"ids": 9}
    assert slot.array("ids").tolist() == list(range(6))
    maps.keep([])
    pool.close()


def test_a_full_shared_memory_is_a_clear_error_and_leaves_no_file(monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = set(os.listdir(vllm_transfer.SHM_DIR))
    monkeypatch.setattr(vllm_transfer.os, "posix_fallocate", full)
    with pytest.raises(SlotError, match="cannot reserve .* MiB of shared memory.*--window"):
        SlotPool().acquire(SPECS)
    assert set(os.listdir(vllm_transfer.SHM_DIR)) == before


def test_rows_for_a_capture_process_on_another_host_travel_in_the_reply():
    rows = _window(3)
    host = HostArrays(SPECS)
    for row, n in ((0, 2), (2, 4)):
        for name, t in rows.items():
            host.put(name, t[row:row + n], row)
    host.ready()
    got = {name: from_wire(w) for name, w in host.wire().items()}
    for name, (dtype, shape) in SPECS.items():
        assert got[name].dtype == getattr(torch, dtype) and list(got[name].shape) == shape
        assert torch.equal(got[name], rows[name].to(got[name].dtype))


@pytest.mark.gpu
def test_device_rows_are_copied_straight_into_the_page_locked_slot():
    torch.cuda.init()
    pool, maps = SlotPool(), SlotMaps()
    rows = _window(4, "cuda")
    slot, sink = _record(pool, maps, rows)
    assert sink.pinned, "the slot could not be page-locked: copies go through staging"
    for name in SPECS:
        t = slot.array(name)
        assert torch.equal(t, rows[name].cpu().to(t.dtype))
    del t
    maps.keep([])
    pool.close()
