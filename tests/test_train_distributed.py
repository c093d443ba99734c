"""Two processes under torchrun (gloo, CPU) train exactly what one process trains with the
same global batch: the same sequences per step, the same losses and held-out metrics, and
the same final weights (up to float32 summation order). Also: a checkpoint written by two
ranks resumes on one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train_fixtures import finish_or_fail, tiny_config, write_training_inputs

STEPS = 5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_training_inputs(tmp_path_factory.mktemp("ddp"), n_docs=36)


def _run(inputs, out, *, procs: int, accum: int, resume: bool = False,
         strategy: str = "auto") -> None:
    sets = tiny_config(out, inputs / "ds", inputs / "student", heldout=inputs / "held",
                       **{"train.max_steps": STEPS, "train.grad_accum": accum,
                          "train.micro_batch": 2, "eval.every": 2, "checkpoint.every": 2,
                          "parallel.backend": "gloo", "parallel.strategy": strategy,
                          "optim.lr": 1e-2})
    sets += ["loss.terms=[{kind: kl, weight: 0.7, temperature: 2.0}, {kind: ce, weight: 0.1}, "
             "{kind: hidden_mse, weight: 0.2}]"]
    launcher = [sys.executable, str(inputs / "launch.py")] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={procs}", str(inputs / "launch.py")]
    cmd = launcher + ["train"] + (["--resume"] if resume else []) + \
        [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a session of its own, so a hung run's worker processes are killed with it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _, err = finish_or_fail(proc, 300, "training did not finish")
    assert proc.returncode == 0, err[-4000:]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    one = tmp_path_factory.mktemp("one")
    _run(inputs, one, procs=1, accum=4)
    return one / "run"


@pytest.fixture(scope="module")
def pair(inputs, tmp_path_factory):
    two = tmp_path_factory.mktemp("two")
    _run(inputs, two, procs=2, accum=2, strategy="ddp")
    return two / "run"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(inputs, single, pair, strategy,
                                                                tmp_path):
    one, two = single, pair
    if strategy == "fsdp":
        _run(inputs, tmp_path, procs=2, accum=2, strategy="fsdp")
        two = tmp_path / "run"
    a, b = _records(one), _records(two)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("tokens", "rows", "sample_in_epoch", "tokens_seen"):
            if key in ra:
                assert ra[key] == rb[key], (ra["step"], key)
        for key in ("loss", "loss_kl_t2", "loss_ce", "loss_hidden_mse", "grad_norm", "kl",
                    "top1", "ce"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa = load_file(one / "final" / "model.safetensors")
    wb = load_file(two / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_checkpoint_of_two_ranks_resumes_on_one(inputs, single, pair, tmp_path):
    """Drop the two-rank run's last checkpoint and finish it in one process."""
    one, two = single, pair
    shutil.copytree(two, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}")
    _run(inputs, tmp_path, procs=1, accum=4, resume=True)
    expected = {(r["kind"], r["step"]): r for r in _records(one)}
    resumed = _records(tmp_path / "run")
    assert [(r["kind"], r["step"]) for r in resumed] == list(expected)
    for r in resumed:
        key = "loss" if r["kind"] == "train" else "kl"
        assert r[key] == pytest.approx(expected[(r["kind"], r["step"])][key], rel=1e-5)
