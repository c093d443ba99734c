"""The vLLM workers' arrays reaching the capture process (capture.vllm_transfer): through the
capture process's shared-memory slot on one host, in the reply across hosts; both give back
exactly what the workers recorded, step after step."""

from __future__ import annotations

import torch

from kdpipe.capture.vllm_transfer import HostArrays, SharedSlot, fetch, host_id, to_wire


def _worker(seed: int, steps=(5, 0, 7)) -> tuple[HostArrays, dict]:
    """A worker's recordings (bf16 hidden states, int32 ids from int64, float32 values) and
    what they join to."""
    g = torch.Generator().manual_seed(seed)
    arrays = HostArrays()
    for n in steps:
        arrays.add("hidden.3", torch.randn(n, 6, generator=g).bfloat16())
        arrays.add("topk_ids", torch.randint(0, 1000, (n, 4), generator=g), torch.int32)
        arrays.add("topk_lps", torch.randn(n, 4, generator=g))
    arrays.ready()
    return arrays, {name: arrays.joined(name) for name in arrays.parts}


def _reply(arrays: HostArrays, rank: str, driver_host: str) -> dict:
    """What a worker's ``take`` answers (``_WorkerCapture.take``), without vLLM."""
    here = host_id()
    specs = arrays.specs()
    return {"rank": rank, "host": here, "arrays": specs if driver_host == here else {},
            "wire": None if driver_host == here else
            {name: to_wire(arrays.joined(name)) for name in specs}}


def test_shared_slot_carries_every_worker_exactly_and_is_reused():
    workers = {"0,0": _worker(0), "0,1": _worker(1, steps=(3,))}
    slot, names = SharedSlot(), []
    try:
        for _ in range(2):         # a second window reuses the slot
            replies = [_reply(a, rank, host_id()) for rank, (a, _) in workers.items()]
            calls = []

            def write(name, plan):
                calls.append(name)
                for rank, (a, _) in workers.items():
                    a.write(name, plan[rank])

            got = fetch(replies, write, slot)
            assert len(calls) == 1
            for (rank, (_, want)), arrays in zip(workers.items(), got):
                assert sorted(arrays) == sorted(want)
                for name, t in want.items():
                    assert arrays[name].dtype == t.dtype and torch.equal(arrays[name], t)
            names.append(slot.shm.name)
        assert names[0] == names[1]
    finally:
        slot.close()
    assert slot.shm is None


def test_a_worker_on_another_host_answers_on_the_wire():
    arrays, want = _worker(2)
    reply = _reply(arrays, "0,0", "another-host/boot")
    slot = SharedSlot()

    def write(name, plan):
        raise AssertionError("nothing to write on this host")

    (got,) = fetch([reply], write, slot)
    assert slot.shm is None
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_an_empty_window_needs_no_slot():
    slot = SharedSlot()
    got = fetch([{"rank": "0,0", "host": host_id(), "arrays": {}, "wire": None}],
                lambda *a: None, slot)
    assert got == [{}] and slot.shm is None
