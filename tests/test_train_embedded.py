"""Distillation works on the real embedded teacher: a 3:1 hybrid student converted from
SmolLM2-135M-Instruct, trained on its captured top-k (default codec), lowers its training
loss and its held-out KL to the teacher. Slow on CPU (the 30-layer student runs at tens of
tokens per second), so the data is tiny: every step sees the same two documents."""

from __future__ import annotations

import json

import pytest

from kdpipe.capture.run import CaptureOptions, run_capture
from tests.helpers import docstring_texts, write_jsonl

SEQ = 24


@pytest.fixture(scope="module")
def captured(tmp_path_factory, teacher_dir):
    tmp = tmp_path_factory.mktemp("embedded")
    texts = docstring_texts(4, 300)
    for name, part, codec in (("train", texts[:2], "default"), ("held", texts[2:4], "exact")):
        data = write_jsonl(tmp / f"{name}.jsonl", [{"text": t} for t in part])
        run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(tmp / name),
                                   top_k=32, max_seq_len=SEQ, codec=codec, progress=False))
    return tmp


@pytest.mark.slow
def test_training_lowers_loss_and_heldout_kl(captured, teacher_dir, tmp_path):
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer

    cfg = load_config(
        "student_train/configs/demo.yaml",
        [f"out={tmp_path / 'run'}", f"student.teacher={teacher_dir}",
         f"data.path={captured / 'train'}", f"eval.data={captured / 'held'}",
         f"data.seq_len={SEQ}", "train.micro_batch=2", "train.max_steps=4",
         "optim.warmup_steps=0", "optim.lr=3e-3", "optim.schedule=constant",
         "checkpoint.every=0", "eval.max_tokens=0", "log.progress=false",
         "log.tensorboard=false", "train.device=cpu"])
    result = Trainer(cfg).train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    # every step trains on the same two documents, so the losses are comparable
    assert losses[-1] < losses[0] * 0.95, losses
    assert [e["step"] for e in evals] == [0, 4]
    assert evals[1]["kl"] < evals[0]["kl"] * 0.95, evals
    assert result["eval"]["kl"] == evals[1]["kl"]
    stages = [r["stage_s"] for r in records if r["kind"] == "train"]
    assert all(set(s) == {"data_wait", "forward_backward", "optimizer", "eval", "checkpoint"}
               and min(s.values()) >= 0 for s in stages)
    assert stages[0]["eval"] > 0 and stages[1]["eval"] == 0   # the evaluation at the start
