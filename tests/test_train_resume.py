"""`kdpipe train` killed with SIGKILL, or stopped with SIGTERM or SIGINT, and resumed with
--resume reproduces the uninterrupted run exactly: the same per-step losses, held-out metrics
and final weights (CPU, bitwise)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train_fixtures import finish_or_fail, tiny_config, write_training_inputs

LAUNCH = "from kdpipe.cli import main; main()"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_training_inputs(tmp_path_factory.mktemp("resume"))


def _args(inputs, out, steps=24) -> list[str]:
    sets = tiny_config(out, inputs / "ds", inputs / "student", heldout=inputs / "held",
                       **{"train.max_steps": steps, "train.grad_accum": 2,
                          "checkpoint.every": 3, "checkpoint.keep_last": 2, "eval.every": 6,
                          "data.workers": 1, "optim.weight_decay": 0.01})
    sets += ["loss.terms=[{kind: kl, weight: 0.6, temperature: 2.0, missing: tail}, "
             "{kind: ce, weight: 0.2}, {kind: hidden_cosine, weight: 0.2}]"]
    cmd = [sys.executable, "-c", LAUNCH, "train"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(full, other) -> None:
    """Per-step losses, held-out metrics and final weights are bitwise equal."""
    a, b = _records(full / "run"), _records(other / "run")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_kl_t2", "loss_ce", "loss_hidden_cosine", "grad_norm", "lr",
                    "kl", "top1", "ce", "epoch", "sample_in_epoch", "tokens_seen"):
            if key in ra:
                assert ra[key] == rb[key], (ra["kind"], ra["step"], key, ra[key], rb[key])
    wa = load_file(full / "run" / "final" / "model.safetensors")
    wb = load_file(other / "run" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigkill_then_resume_equals_uninterrupted(inputs, uninterrupted, tmp_path):
    full = uninterrupted
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_args(inputs, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = killed / "run" / "checkpoints" / "step-00000006" / "meta.json"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "run" / "checkpoints").iterdir())
    assert "step-00000024" not in done

    result = subprocess.run(_args(inputs, killed) + ["--resume"], env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    _assert_same_run(full, killed)
    # only the last keep_last checkpoints remain
    kept = sorted(p.name for p in (killed / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000021", "step-00000024"]


def test_existing_run_needs_resume_or_overwrite(inputs, tmp_path):
    from kdpipe.schemas import ConfigError
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer

    cfg = load_config(None, tiny_config(tmp_path, inputs / "ds", inputs / "student",
                                        **{"train.max_steps": 2}))
    Trainer(cfg).train()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(cfg)
    assert Trainer(cfg, resume=True).train()["step"] == 2     # nothing left to do
    assert Trainer(cfg, overwrite=True).train()["step"] == 2


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    subprocess.run(_args(inputs, full), check=True, env=_env(), capture_output=True)
    return full


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_prints_the_resume_command_and_resume_equals_uninterrupted(
        inputs, uninterrupted, tmp_path, sig, code):
    """SIGTERM (preemption) and SIGINT (Ctrl-C, sent to the whole process group as a terminal
    does, loader workers included) both checkpoint the step they stop at and print the exact
    command that continues; running that command finishes the run as if never stopped."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_args(inputs, stopped), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = stopped / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (
            metrics.exists() and '"step": 4' in metrics.read_text()):
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be stopped"
    os.killpg(proc.pid, sig)
    out, err = finish_or_fail(proc, 300, "the stopped run did not exit")
    assert proc.returncode == code, err[-3000:]
    step = int(re.search(rf"stopped by {sig.name} after step (\d+)", out).group(1))
    steps = sorted(p.name for p in (stopped / "run" / "checkpoints").iterdir())
    assert steps[-1] == f"step-{step:08d}" and step < 24    # checkpointed where it stopped
    assert not (stopped / "run" / "final").exists()
    command = shlex.split(out.split("Continue with:", 1)[1].strip().splitlines()[0])
    assert command[:2] == ["kdpipe", "train"] and command[-1] == "--resume"
    assert command[2:-1] == _args(inputs, stopped)[4:]       # the same --set overrides
    result = subprocess.run([sys.executable, "-c", LAUNCH] + command[1:], env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(uninterrupted, stopped)


def test_checkpoints_are_flushed_to_disk_before_they_are_published(inputs, tmp_path,
                                                                    monkeypatch):
    from kdpipe.student_train import checkpoint
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer

    synced, fsync = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", record)
    cfg = load_config(None, tiny_config(tmp_path, inputs / "ds", inputs / "student",
                                        **{"train.max_steps": 2, "checkpoint.every": 1}))
    Trainer(cfg).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    files = [p for p in ckpt.rglob("*")]
    assert any(p.name == "model.safetensors" for p in files)
    for path in files + [ckpt]:   # under the temporary name, before the rename
        assert str(path).replace(ckpt.name, f".tmp-{ckpt.name}") in synced, path
    assert str(ckpt.parent) in synced   # the rename itself
