"""Builders shared by the training tests (no tests here): a synthetic captured dataset from a
consistent toy teacher, and a tiny random student whose vocabulary matches it.

The toy teacher is a bigram model: the distribution after token x is a fixed random softmax
row, and the hidden state of layer l at token x a fixed random vector, so a student can
learn both and losses fall quickly.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.compress import PartWriter
from kdpipe.schemas import CaptureSettings, CodecConfig, TeacherDocument, TeacherInfo

VOCAB, K, HIDDEN, LAYERS = 64, 8, 16, (0, 1, 2)
EXACT = CodecConfig.from_dict({"name": "exact", "ids": "int32", "values": "float32",
                               "hidden": "native"})


def toy_teacher(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(VOCAB, VOCAB, generator=g) * 2.5, -1)
    hidden = {layer: torch.randn(VOCAB, HIDDEN, generator=g) for layer in LAYERS}
    return logprobs, hidden


def write_dataset(out: Path | str, *, n_docs: int = 40, seed: int = 0, min_len: int = 3,
                  max_len: int = 40, docs_per_shard: int = 9, row_group_bytes: int = 6000,
                  teacher_mask_every: int = 0, loss_mask_every: int = 0) -> list[TeacherDocument]:
    """A dataset of ``n_docs`` toy-teacher documents in several shards and row groups
    (``out``: a directory or a filesystem URL)."""
    rng = np.random.default_rng(seed)
    logprobs, hidden = toy_teacher()
    teacher = TeacherInfo("toy", "ToyBigram", "0" * 64, VOCAB, HIDDEN, 2, "1" * 64,
                          {"bos": None, "eos": None, "pad": None, "unk": None}, "float32")
    capture = CaptureSettings("hf", K, 64, "float32", False, list(LAYERS), "text", "truncate",
                              "toy")
    w = PartWriter(str(out), teacher=teacher, capture=capture, codec=EXACT, index=0, count=1,
                   docs_per_shard=docs_per_shard, row_group_bytes=row_group_bytes)
    docs = []
    for i in range(n_docs):
        T = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(0, VOCAB, T).astype(np.int32)
        tmask = None
        if teacher_mask_every and i % teacher_mask_every == 0:
            tmask = rng.random(T) < 0.7
        rows = np.arange(T) if tmask is None else np.nonzero(tmask)[0]
        lps, top = logprobs[torch.from_numpy(ids[rows]).long()].topk(K, dim=-1)
        lmask = (rng.random(T) < 0.6) if loss_mask_every and i % loss_mask_every == 0 else None
        doc = TeacherDocument(
            doc_id=f"doc-{i:04d}", input_ids=ids, topk_ids=top, topk_logprobs=lps,
            teacher_mask=tmask, loss_mask=lmask, record_index=i,
            hidden={layer: hidden[layer][torch.from_numpy(ids).long()] for layer in LAYERS})
        w.add_record(i, [doc])
        w.end_window()
        docs.append(doc)
    w.finish()
    return docs


def write_student(out: Path, *, seed: int = 0, hidden_size: int = 32,
                  layer_types=("kda", "full_nope")) -> Path:
    import kdpipe.student_train  # noqa: F401
    from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM

    torch.manual_seed(seed)
    config = KDAHybridConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=48,
                             num_hidden_layers=len(layer_types), num_attention_heads=2,
                             num_key_value_heads=1, head_dim=hidden_size // 2,
                             layer_types=list(layer_types), mlp_gated=False, hidden_act="relu2",
                             kda_backend="torch")
    KDAHybridForCausalLM(config).save_pretrained(out)
    return out


def write_training_inputs(tmp: Path, *, n_docs: int = 30, n_held: int = 6,
                          hidden_size: int = 32) -> Path:
    """``tmp/ds`` (the toy dataset), ``tmp/held`` (held-out), ``tmp/student``, and
    ``tmp/launch.py`` for torchrun."""
    write_dataset(tmp / "ds", n_docs=n_docs, teacher_mask_every=5, loss_mask_every=4)
    write_dataset(tmp / "held", n_docs=n_held, seed=9)
    write_student(tmp / "student", hidden_size=hidden_size)
    (tmp / "launch.py").write_text("from kdpipe.cli import main\nmain()\n")
    return tmp


def finish_or_fail(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """(stdout, stderr) of a process started with ``start_new_session=True``; past
    ``timeout`` its whole process group (torchrun's workers too) is killed and the test
    fails with ``what`` and the end of stderr."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{what} (after {timeout} s): {(err or '')[-4000:]}")


def tiny_config(tmp: Path, data: Path, student: Path, *, heldout: Path | None = None,
                **sections) -> list[str]:
    """``--set`` overrides for a fast CPU run of the tiny student on the toy dataset."""
    sets = {"out": str(tmp / "run"), "student.path": str(student), "data.path": str(data),
            "data.seq_len": 24, "data.check_tokenizer": False, "data.shuffle_block": 2,
            "train.max_steps": 6, "train.device": "cpu", "log.progress": False,
            "log.tensorboard": False, "loss.chunk_size": 7, "optim.lr": 3e-3,
            "optim.warmup_steps": 1}
    if heldout is not None:
        sets["eval.data"] = str(heldout)
    sets.update(sections)
    return [f"{k}={v}" for k, v in sets.items()]
