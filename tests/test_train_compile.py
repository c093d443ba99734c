"""The compiled training step against the eager one: regional ``torch.compile`` of the decoder
layers changes how elementwise work is fused, never what a step computes."""

from __future__ import annotations

import json

import pytest

from kdpipe.student_train.train_config import load_config
from kdpipe.student_train.trainer import Trainer
from test_train_fixtures import tiny_config, write_training_inputs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_training_inputs(tmp_path_factory.mktemp("compile"), n_docs=24, n_held=6)


def _losses(toy, out, compile_: str, **extra) -> tuple[list[float], list[float]]:
    sets = tiny_config(out, toy / "ds", toy / "student", heldout=toy / "held",
                       **{"train.compile": compile_, "train.max_steps": 4, "eval.every": 4,
                          "data.workers": 0, **extra})
    Trainer(load_config(None, sets + [
        "loss.terms=[{kind: kl, weight: 0.5, temperature: 2.0, missing: tail}, "
        "{kind: ce, weight: 0.2}, {kind: hidden_cosine, weight: 0.3}]"])).train()
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if r["kind"] == "train"],
            [r["kl"] for r in records if r["kind"] == "eval"])


def _compare(toy, tmp_path, rel: float, **extra) -> None:
    eager = _losses(toy, tmp_path / "eager", "none", **extra)
    compiled = _losses(toy, tmp_path / "compiled", "layers", **extra)
    assert len(eager[0]) == 4 and len(eager[1]) >= 1
    assert compiled[0] == pytest.approx(eager[0], rel=rel)
    assert compiled[1] == pytest.approx(eager[1], rel=rel)


@pytest.mark.gpu
def test_compiled_layers_train_like_eager_on_gpu(toy, tmp_path):
    """fla kernels under bf16 autocast with device decoding and activation checkpointing:
    fused kernels round bf16 intermediates differently, so losses agree to bf16 precision."""
    _compare(toy, tmp_path, rel=2e-2, **{
        "train.device": "cuda", "student.kda_backend": "fla", "train.precision": "bf16",
        "data.decode_on": "device", "train.gradient_checkpointing": True,
        "data.seq_len": 64, "train.micro_batch": 2})
