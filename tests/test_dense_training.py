"""Training and evaluation on a dense dataset: the dense terms train, the held-out metrics
over the whole vocabulary, and the refusals (no head, another vocabulary, not dense)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.compress import Dataset, PartWriter
from kdpipe.compress.dense import HEAD_ARTIFACT, TeacherHead, full_logprobs, load_head
from kdpipe.schemas import (CaptureSettings, CodecConfig, ConfigError, DatasetError,
                            TeacherDocument, TeacherInfo)
from kdpipe.student_train.evaluate import evaluate_student
from kdpipe.student_train.train_config import load_config
from kdpipe.student_train.trainer import Trainer
from test_train_fixtures import VOCAB, tiny_config, write_dataset, write_student

HIDDEN, LAST = 16, 2
DENSE = CodecConfig.from_dict({"name": "dense-exact", "ids": "int32", "values": "float32",
                               "hidden": "native", "dense": True})


def toy_head(seed: int = 0) -> TeacherHead:
    g = torch.Generator().manual_seed(seed)
    return TeacherHead(norm="rmsnorm", norm_weight=torch.rand(HIDDEN, generator=g) + 0.5,
                       eps=1e-6, weight=torch.randn(VOCAB, HIDDEN, generator=g) * 0.8)


def write_dense(out: Path, *, n_docs: int, seed: int = 0, k: int = 4) -> Path:
    """A dense toy dataset: the last layer's state after token x is a fixed random vector,
    the teacher's distribution that of the toy head on it (a bigram teacher)."""
    rng = np.random.default_rng(seed)
    head = toy_head()
    states = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(5)) * 2
    logprobs = full_logprobs(head, states)
    teacher = TeacherInfo("toy", "ToyBigram", "0" * 64, VOCAB, HIDDEN, LAST, "1" * 64,
                          {"bos": None, "eos": None, "pad": None, "unk": None}, "float32")
    capture = CaptureSettings("hf", k, 64, "float32", False, [LAST], "text", "truncate", "toy")
    with PartWriter(str(out), teacher=teacher, capture=capture, codec=DENSE, index=0, count=1,
                    docs_per_shard=8, artifacts={HEAD_ARTIFACT: head.to_bytes()}) as w:
        for i in range(n_docs):
            ids = rng.integers(0, VOCAB, int(rng.integers(4, 30))).astype(np.int32)
            t = torch.from_numpy(ids).long()
            lps, top = logprobs[t].topk(k, dim=-1)
            w.add_record(i, [TeacherDocument(doc_id=f"d{i}", input_ids=ids, topk_ids=top,
                                             topk_logprobs=lps, record_index=i,
                                             hidden={LAST: states[t]})])
            w.end_window()
        w.finish()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    write_dense(tmp / "ds", n_docs=24)
    write_dense(tmp / "held", n_docs=5, seed=3)
    write_dataset(tmp / "topk", n_docs=6)
    write_student(tmp / "student")
    return tmp


def _cfg(inputs: Path, out: Path, data: Path | None = None, **sets):
    return load_config(None, tiny_config(inputs, data or inputs / "ds", inputs / "student",
                                         heldout=inputs / "held",
                                         **{"out": str(out), **sets}))


def test_dense_terms_train_and_held_out_full_kl_falls(inputs, tmp_path):
    cfg = _cfg(inputs, tmp_path / "run", **{
        "loss.terms": [{"kind": "dense_kl", "weight": 0.5},
                       {"kind": "dense_jsd", "weight": 0.3, "temperature": 2.0},
                       {"kind": "dense_reverse_kl", "weight": 0.2}],
        "train.max_steps": 12, "optim.lr": 1e-2})
    result = Trainer(cfg).train()
    evals = [e for e in _records(tmp_path / "run", "eval")]
    first, last = evals[0], evals[-1]
    assert {"kl_full", "top1_full"} <= set(last)
    assert last["kl_full"] < 0.8 * first["kl_full"]
    assert result["train"]["loss_dense_kl"] > 0
    # the full KL is at least the top-k + tail bucket KL (grouping never increases KL)
    assert last["kl_full"] >= last["kl"] - 1e-6


def _records(run: Path, kind: str) -> list[dict]:
    import json
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == kind]


def test_eval_cli_metrics_on_a_dense_set_match_a_direct_computation(inputs):
    from kdpipe.student_train.evaluate import load_student
    m = evaluate_student(str(inputs / "student"), str(inputs / "held"), seq_len=64,
                         device="cpu", check_tokenizer=False)
    student = load_student(str(inputs / "student"))
    ds = Dataset(str(inputs / "held"))
    head = load_head(ds)
    kls, agree, rows = 0.0, 0, 0
    with torch.no_grad():
        for doc in ds.iter_documents():
            out = student(torch.from_numpy(doc.input_ids).long()[None])
            s = torch.log_softmax(out.logits[0].double(), -1)
            t = full_logprobs(head, doc.hidden[LAST]).double()
            kls += float((t.exp() * (t - s)).sum())
            agree += int((t.argmax(-1) == s.argmax(-1)).sum())
            rows += doc.num_tokens
    assert m["rows"] == rows
    assert m["kl_full"] == pytest.approx(kls / rows, rel=1e-4)
    assert m["top1_full"] == pytest.approx(agree / rows)


def test_refusals_are_one_line(inputs, tmp_path):
    import shutil
    dense_loss = {"loss.terms": [{"kind": "dense_kl"}]}
    # not a dense dataset
    with pytest.raises(ConfigError, match=r"topk: not a dense dataset") as e:
        Trainer(_cfg(inputs, tmp_path / "a", inputs / "topk", **{**dense_loss,
                                                                  "eval.data": "null"}))
    assert "\n" not in str(e.value)
    # a dense dataset whose head is gone
    broken = tmp_path / "nohead"
    shutil.copytree(inputs / "ds", broken)
    (broken / HEAD_ARTIFACT).unlink()
    with pytest.raises(DatasetError, match="teacher_head.safetensors: codec artifact listed in "
                                           "the manifest is missing") as e:
        Trainer(_cfg(inputs, tmp_path / "b", broken, **dense_loss))
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="is missing"):   # also without dense terms
        Trainer(_cfg(inputs, tmp_path / "b2", broken, **{"eval.data": "null"}))
    with pytest.raises(DatasetError, match="is missing"):
        evaluate_student(str(inputs / "student"), str(broken), device="cpu",
                         check_tokenizer=False)
    # a student of another vocabulary
    other = write_student(tmp_path / "student_v", hidden_size=32)
    import json
    cfg_path = other / "config.json"
    conf = json.loads(cfg_path.read_text())
    conf["vocab_size"] = VOCAB + 3
    cfg_path.write_text(json.dumps(conf))
    from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM
    KDAHybridForCausalLM(KDAHybridConfig.from_pretrained(other)).save_pretrained(other)
    for run in (lambda: Trainer(_cfg(inputs, tmp_path / "c", **{**dense_loss,
                                                                "student.path": str(other)})),
                lambda: evaluate_student(str(other), str(inputs / "held"), device="cpu",
                                         check_tokenizer=False)):
        with pytest.raises(ConfigError, match=rf"teacher head has a vocabulary of {VOCAB} "
                                              rf"tokens, student .* has vocab_size {VOCAB + 3}"
                           ) as e:
            run()
        assert "\n" not in str(e.value)
