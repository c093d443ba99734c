"""The training objective on the tiny student: gradient accumulation with global normalizers
equals one big batch, activation checkpointing changes nothing, projections start right."""

from __future__ import annotations

import pytest
import torch

from kdpipe.compress import Dataset
from kdpipe.student_train.evaluate import load_student
from kdpipe.student_train.model.modeling import enable_activation_checkpointing
from kdpipe.student_train.stream_loader import DistillStream, build_index
from kdpipe.student_train.train_config import LossConfig, LossTerm
from kdpipe.student_train.train_objective import DistillModule, training_objective, weighted_loss
from test_train_fixtures import HIDDEN, LAYERS, write_dataset, write_student

TERMS = [LossTerm(kind="kl", weight=0.5, temperature=2.0, missing="tail"),
         LossTerm(kind="jsd", weight=0.1), LossTerm(kind="ce", weight=0.2),
         LossTerm(kind="hidden_cosine", weight=0.2)]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("objective")
    write_dataset(tmp / "ds", n_docs=12, teacher_mask_every=3, loss_mask_every=2)
    write_student(tmp / "student")
    return tmp


def _module(parts, **kw):
    torch.manual_seed(0)
    student = load_student(str(parts / "student"))
    obj = training_objective(LossConfig(terms=TERMS, chunk_size=5), layer_map=[(1, 1), (2, 2)])
    return DistillModule(student, objective=obj, teacher_hidden_size=HIDDEN, **kw), obj


def _batches(parts, micro):
    s = DistillStream(str(parts / "ds"), build_index(Dataset(str(parts / "ds"))), seq_len=20,
                      packing="whole", shuffle=False, shuffle_block=1, streams=1, seed=0,
                      micro_batch=micro, grad_accum=1, hidden_layers=list(LAYERS))
    return list(s)


def _grads(module, obj, batches):
    counts = {}
    for b in batches:
        for k, v in b.counts().items():
            counts[k] = counts.get(k, 0) + v
    module.zero_grad()
    for b in batches:
        weighted_loss(module(b), obj, counts).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_equal_one_batch(parts):
    module, obj = _module(parts)
    one = _grads(module, obj, _batches(parts, 4)[:1])           # 4 sequences at once
    four = _grads(module, obj, _batches(parts, 1)[:4])          # the same 4, one at a time
    assert one.keys() == four.keys()
    for n in one:
        torch.testing.assert_close(four[n], one[n], rtol=1e-4, atol=1e-6, msg=n)


def test_activation_checkpointing_changes_nothing(parts):
    batches = _batches(parts, 2)[:2]
    module, obj = _module(parts)
    plain = _grads(module, obj, batches)
    enable_activation_checkpointing(module.student)
    module.train()
    ckpt = _grads(module, obj, batches)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_projections(parts):
    module, _ = _module(parts)                                   # 32 -> 16: learned maps
    assert sorted(module.projections) == ["1", "2"]
    assert module.projections["1"].weight.shape == (HIDDEN, 32)
    student = load_student(str(write_student(parts / "same", hidden_size=HIDDEN)))
    obj = training_objective(LossConfig(terms=TERMS), layer_map=[(1, 1)])
    assert not DistillModule(student, objective=obj, teacher_hidden_size=HIDDEN).projections
    always = DistillModule(student, objective=obj, teacher_hidden_size=HIDDEN,
                           projection="always").projections["1"]
    assert torch.equal(always.weight, torch.eye(HIDDEN))


def test_term_names_are_unique():
    obj = training_objective(LossConfig(terms=[LossTerm(kind="kl"), LossTerm(kind="kl"),
                                               LossTerm(kind="kl", temperature=2.0)]),
                             layer_map=[])
    assert [t.name for t in obj.terms] == ["kl", "kl_2", "kl_t2"]
