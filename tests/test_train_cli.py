"""The training commands end to end on the toy dataset: `kdpipe train` through the root CLI,
`kdpipe eval` agreeing with the trainer's own held-out evaluation, `kdpipe plot`, and
`kdpipe demo-summary`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kdpipe.cli import cli
from test_train_fixtures import tiny_config, write_dataset, write_student


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    write_dataset(tmp / "ds", n_docs=20)
    write_dataset(tmp / "held", n_docs=5, seed=3)
    write_student(tmp / "student")
    args = ["train", "--set", "loss.terms=[{kind: kl, weight: 0.7}, {kind: ce, weight: 0.3}]"]
    for s in tiny_config(tmp, tmp / "ds", tmp / "student", heldout=tmp / "held",
                         **{"train.max_steps": 4, "eval.every": 2, "log.tensorboard": True}):
        args += ["--set", s]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trained 4 steps" in result.output
    return tmp


def test_run_directory_contents(run):
    out = run / "run"
    assert (out / "final" / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert any((out / "tensorboard").iterdir())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_eval_command_matches_the_trainers_evaluation(run, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(cli, ["eval", "--student", str(run / "run" / "final"), "--data",
                                      str(run / "held"), "--seq-len", "24", "--device", "cpu",
                                      "--no-tokenizer-check", "--json", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    last = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in x][-1]
    for key in ("kl", "kl_topk", "top1", "ce", "rows"):
        assert got[key] == pytest.approx(last[key], rel=1e-5), key
    assert "kl_topk" in result.output


def test_eval_refuses_a_student_of_another_vocabulary(run, tmp_path):
    import kdpipe.student_train  # noqa: F401
    from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM
    cfg = KDAHybridConfig(vocab_size=10, hidden_size=16, intermediate_size=16,
                          num_hidden_layers=1, num_attention_heads=2, layer_types=["kda"])
    KDAHybridForCausalLM(cfg).save_pretrained(tmp_path / "s")
    result = CliRunner().invoke(cli, ["eval", "--student", str(tmp_path / "s"), "--data",
                                      str(run / "held"), "--no-tokenizer-check"])
    assert result.exit_code != 0
    assert "vocab_size 64" in str(result.exception) and "vocab_size 10" in str(result.exception)


def test_plot_and_demo_summary(run, tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(run / "run"), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "demo" / "summary.json"
    # the run's initial student as the teacher: it agrees with itself before training
    result = CliRunner().invoke(cli, ["demo-summary", "--capture", str(run / "ds"), "--run",
                                      str(run / "run"), "--out", str(out),
                                      "--teacher", str(run / "student")])
    assert result.exit_code == 0, result.output
    s = json.loads(out.read_text())
    assert {"tokens_captured", "bytes_per_token", "kl_before", "kl_after"} <= set(s)
    assert s["gen_agreement_before"] == 1.0 and 0 <= s["gen_agreement_after"] < 1.0
    from kdpipe.compress import Dataset
    m = Dataset(str(run / "ds")).manifest
    assert s["tokens_captured"] == m.tokens
    assert s["bytes_per_token"] == pytest.approx(m.total_bytes / m.tokens)
    assert s["kl_after"] < s["kl_before"]


def test_print_config_and_bad_override():
    result = CliRunner().invoke(cli, ["train", "--print-config", "--set", "student.teacher=x",
                                      "--set", "train.max_steps=3"])
    assert result.exit_code == 0 and "max_steps: 3" in result.output
    result = CliRunner().invoke(cli, ["train", "--set", "train.max_step=3"])
    assert result.exit_code != 0 and "valid keys: max_steps" in str(result.exception)
