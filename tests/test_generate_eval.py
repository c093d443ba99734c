"""Free-running evaluation (`kdpipe eval --generate`): greedy continuations equal step-by-step
full forwards, a student identical to its teacher agrees exactly, the cross-entropy on the
teacher's continuations matches a float64 computation, and prompts are cut as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdpipe.schemas import ConfigError
from test_train_fixtures import write_dataset, write_student


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    write_dataset(tmp / "held", n_docs=12, seed=4, min_len=20, max_len=40)
    write_student(tmp / "teacher", seed=0)
    write_student(tmp / "other", seed=1)
    return tmp


def _load(path):
    from kdpipe.student_train.evaluate import load_student
    return load_student(str(path)).eval()


def test_greedy_equals_step_by_step_argmax(toy):
    from kdpipe.student_train.generate_eval import greedy, heldout_prompts
    model = _load(toy / "teacher")
    prompts = heldout_prompts(str(toy / "held"), prompts=5, prompt_len=9)
    got = greedy(model, prompts, 6, batch_size=2)
    seq = prompts
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1)[:, None]], 1)
    assert got.shape == (5, 6)
    assert torch.equal(got, seq[:, 9:])


def test_identical_student_agrees_exactly_and_ce_matches_float64(toy):
    from kdpipe.student_train.generate_eval import compare, greedy, heldout_prompts
    teacher, other = _load(toy / "teacher"), _load(toy / "other")
    prompts = heldout_prompts(str(toy / "held"), prompts=6, prompt_len=8)
    same = compare(_load(toy / "teacher"), teacher, prompts, 7, batch_size=4)
    assert (same.gen_agreement, same.gen_match) == (1.0, 1.0)

    m = compare(other, teacher, prompts, 7, batch_size=4)
    t_tok, s_tok = greedy(teacher, prompts, 7), greedy(other, prompts, 7)
    agree = [[int(a == b) for a, b in zip(s, t)] for s, t in zip(s_tok.tolist(), t_tok.tolist())]
    assert m.gen_agreement == pytest.approx(np.mean(agree))
    assert m.gen_match == pytest.approx(np.mean([all(r) for r in agree]))
    assert m.gen_agreement < 1.0
    # float64 reference: log-softmax of the student's logits at each continuation position
    with torch.no_grad():
        logits = other.double()(torch.cat([prompts, t_tok], 1), use_cache=False).logits
    lp = torch.log_softmax(logits[:, 7:14], -1)
    ref = -lp.gather(-1, t_tok[..., None]).mean()
    assert m.gen_ce == pytest.approx(float(ref), rel=1e-5)


def test_prompts_end_before_the_first_trained_token(tmp_path):
    from kdpipe.student_train.generate_eval import heldout_prompts
    docs = write_dataset(tmp_path / "d", n_docs=6, seed=2, min_len=30, max_len=40,
                         loss_mask_every=2)
    got = heldout_prompts(str(tmp_path / "d"), prompts=6, prompt_len=4)
    want = []
    for d in docs:
        start = int(np.argmax(d.loss_mask)) if d.loss_mask is not None else 4
        if start >= 4:
            want.append(d.input_ids[start - 4:start])
    assert got.tolist() == np.stack(want).tolist()
    with pytest.raises(ConfigError, match="no document has 400 tokens"):
        heldout_prompts(str(tmp_path / "d"), prompts=2, prompt_len=400)


def test_eval_command_generate(toy, tmp_path, capsys, monkeypatch):
    from tests.helpers import run_main
    out = tmp_path / "m.json"
    code, stdout, _ = run_main(["eval", "--student", toy / "other", "--data", toy / "held",
                                "--seq-len", 40, "--device", "cpu", "--no-tokenizer-check",
                                "--generate", "--teacher", toy / "teacher", "--prompts", 3,
                                "--prompt-len", 8, "--new-tokens", 5, "--json", out],
                               capsys, monkeypatch)
    assert code == 0, stdout
    got = json.loads(out.read_text())
    assert {"kl", "top1", "gen_agreement", "gen_match", "gen_ce"} <= set(got)
    assert (got["prompts"], got["prompt_len"], got["new_tokens"]) == (3, 8, 5)
    assert "gen_agreement" in stdout


def test_default_teacher_is_only_the_embedded_one(toy):
    from kdpipe.student_train.generate_eval import default_teacher
    with pytest.raises(ConfigError, match="captured from 'toy': pass its model directory"):
        default_teacher(str(toy / "held"))
