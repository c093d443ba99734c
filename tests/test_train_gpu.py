"""Training on CUDA (skipped without a GPU): the fla KDA kernels under bf16 autocast with
decoding on the device and gradient checkpointing, the chunked LM head's memory bound, and
DDP/FSDP2 over two GPUs with NCCL matching one GPU."""

from __future__ import annotations

import json
import linecache
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kdpipe.student_train.sparse_kl import HeadTerm, head_losses
from test_train_fixtures import finish_or_fail, tiny_config, write_training_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_training_inputs(tmp_path_factory.mktemp("gpu"), n_docs=40, n_held=8,
                                 hidden_size=64)


def _sets(toy, out, **extra):
    sets = {"train.device": "cuda", "student.kda_backend": "fla", "train.precision": "bf16",
            "data.decode_on": "device", "data.workers": 2, "train.gradient_checkpointing": True,
            "train.max_steps": 12, "train.micro_batch": 2, "train.grad_accum": 2,
            "data.seq_len": 64, "eval.every": 6, "checkpoint.every": 6}
    sets.update(extra)
    return tiny_config(out, toy / "ds", toy / "student", heldout=toy / "held", **sets) + [
        "loss.terms=[{kind: kl, weight: 0.5, temperature: 2.0, missing: tail}, "
        "{kind: ce, weight: 0.2}, {kind: hidden_cosine, weight: 0.3}]"]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fla_bf16_device_decoding_trains(toy, tmp_path):
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer
    # eager: the compiled step is checked against this one in tests/test_train_compile.py
    Trainer(load_config(None, _sets(toy, tmp_path, **{"train.compile": "none"}))).train()
    records = _records(tmp_path / "run")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r["kl"] for r in records if r["kind"] == "eval"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert evals[-1] < evals[0]


def test_fla_and_torch_backends_agree_on_the_first_steps(toy, tmp_path):
    """Same data, same init, fp32, eager: fla kernels and the PyTorch KDA path give close
    losses."""
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer
    runs = {}
    for backend in ("fla", "torch"):
        out = tmp_path / backend
        Trainer(load_config(None, _sets(toy, out, **{"student.kda_backend": backend,
                                                     "train.precision": "fp32",
                                                     "train.compile": "none",
                                                     "train.max_steps": 3}))).train()
        runs[backend] = [r["loss"] for r in _records(out / "run") if r["kind"] == "train"]
    assert runs["fla"] == pytest.approx(runs["torch"], rel=2e-3)


def test_kdpipe_code_never_waits_for_the_device_inside_a_step(toy, tmp_path):
    """From the batches handed out to the last backward, no line of kdpipe makes the host wait
    for the GPU (a read-back, a mask index, a copy from pageable memory): each such wait drains
    the queue the host had built ahead, and the rest of the step is then launch-bound. Waits
    inside the kernels' own libraries are allowed, and printed, as are those of the backward
    pass: autograd reports them at the ``backward()`` call, whoever made them."""
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer
    root = str(Path(__file__).resolve().parents[1])
    trainer = Trainer(load_config(None, _sets(toy, tmp_path, **{"train.compile": "none"})))
    for step in range(2):                  # the second step runs with warm caches
        batches, _ = trainer.batches.next_step()    # no reading thread while warnings count
        counts = {k: float(sum(b.counts()[k] for b in batches)) for k in batches[0].counts()}
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.forward_backward(batches, counts)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits = sorted({(w.filename, w.lineno) for w in caught
                        if "synchronizing" in str(w.message)})
        print(f"step {step}: synchronizing calls at", waits)
        ours = [w for w in waits if w[0].startswith(root) and "site-packages" not in w[0]
                and ".backward(" not in linecache.getline(*w)]
        assert not ours, ours
    trainer.batches.close()


def _head_peak(chunk: int, R=16384, H=512, V=128_000, k=32) -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(R, H, device=dev, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, device=dev, generator=g, dtype=torch.bfloat16, requires_grad=True)
    # distinct ids per row without materializing [R, V]
    ids = (torch.arange(k, device=dev) * 3989 + torch.randint(0, V, (R, 1), device=dev)) % V
    lps = torch.log_softmax(torch.randn(R, k, device=dev), -1) - 0.1
    targets = dict(topk_ids=ids, topk_logprobs=lps, tail=1 - lps.exp().sum(-1),
                   has_teacher=torch.ones(R, dtype=torch.bool, device=dev), labels=ids[:, 0])
    terms = [HeadTerm("kl", "kl", 2.0, "tail"), HeadTerm("ce", "ce")]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sums = head_losses(h, w, terms=terms, chunk_size=chunk, **targets)
    sum(sums.values()).backward()
    assert all(torch.isfinite(v) for v in sums.values())
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_chunked_head_memory_is_bounded_by_the_chunk():
    """16k positions x 128k vocabulary: float32 logits alone would be 8 GiB; in chunks of
    1024 positions the peak stays a few chunk-sized buffers and scales with the chunk."""
    small, large = _head_peak(1024), _head_peak(4096)
    assert small < 6 * 2**30, small / 2**30
    assert large > 2 * small, (small / 2**30, large / 2**30)


def _torchrun(toy, out, procs, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={procs}", str(toy / "launch.py"), "train"]
    for s in _sets(toy, out, **extra):
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, err = finish_or_fail(proc, 600, "distributed run hung")
    assert proc.returncode == 0, err[-4000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_match_one(toy, tmp_path, strategy):
    common = {"train.precision": "fp32", "train.max_steps": 4, "data.workers": 0}
    _torchrun(toy, tmp_path / "one", 1, **common, **{"train.grad_accum": 4})
    _torchrun(toy, tmp_path / "two", 2, **common, **{"train.grad_accum": 2,
                                                      "parallel.strategy": strategy})
    a, b = _records(tmp_path / "one" / "run"), _records(tmp_path / "two" / "run")
    for ra, rb in zip(a, b):
        key = "loss" if ra["kind"] == "train" else "kl"
        assert rb[key] == pytest.approx(ra[key], rel=1e-4)
