"""Teacher -> student conversion and ``student init`` on the real embedded teacher."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, ArceeConfig, ArceeForCausalLM,
                          MistralConfig)

import kdpipe.student_train  # noqa: F401  (registers the Auto classes)
from kdpipe.schemas import ConfigError
from kdpipe.student_train import KDAHybridForCausalLM
from kdpipe.student_train.cli import student
from kdpipe.student_train.model.convert import convert_teacher, plan_student, repeat_kv_heads
from test_student_config import afm_config

TEXT = ("Knowledge distillation trains a small student model to match the output "
        "distribution of a larger teacher, one token at a time.")


def test_repeat_kv_heads_repeats_whole_heads():
    n_kv, group, head_dim, hidden = 3, 4, 5, 7
    head_of_row = torch.arange(n_kv, dtype=torch.float32).repeat_interleave(head_dim)
    weight = head_of_row[:, None].expand(-1, hidden)
    out = repeat_kv_heads(weight, n_kv, n_kv * group).view(n_kv * group, head_dim, hidden)
    for j in range(n_kv * group):
        assert torch.all(out[j] == j // group)


def test_teacher_pattern_reproduces_teacher_logits(teacher_dir, tmp_path):
    convert_teacher(teacher_dir, "teacher", tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    assert isinstance(student, KDAHybridForCausalLM)
    ids = AutoTokenizer.from_pretrained(teacher_dir)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_cli_init_three_to_one(teacher_dir, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(student, ["init", "--teacher", str(teacher_dir), "--pattern", "3:1",
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    for label in ("copied from the teacher", "fresh (KDA init)", "total"):
        assert label in result.output
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = model.config
    full = [i for i, t in enumerate(config.layer_types) if t != "kda"]
    assert full == [3, 7, 11, 15, 19, 23, 27, 29]
    assert set(config.layer_types) == {"kda", "full_nope"}

    teacher = load_file(teacher_dir / "model.safetensors")
    state = model.state_dict()
    total = int(re.search(r"^total\s+([\d,]+)", result.output, re.M).group(1).replace(",", ""))
    assert total == sum(p.numel() for p in model.parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.o_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight"):
        assert torch.equal(state[name], teacher[name]), name
    # GQA: KDA head j starts from teacher KV head j // group, whole heads.
    group = config.num_attention_heads // config.num_key_value_heads
    for proj in ("k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        t = teacher[name].view(config.num_key_value_heads, config.head_dim, -1)
        s = state[name].view(config.num_attention_heads, config.head_dim, -1)
        for j in range(config.num_attention_heads):
            assert torch.equal(s[j], t[j // group]), (proj, j)
    # KDA-only parameters come from fla's initialization.
    attn = model.model.layers[0].self_attn
    assert torch.all((attn.A_log.exp() >= 1) & (attn.A_log.exp() <= 16))
    dt = torch.nn.functional.softplus(attn.dt_bias)
    assert torch.all((dt > 0.9e-4) & (dt < 0.11))
    assert 0.015 < attn.q_conv1d.weight.std() < 0.025
    assert torch.all(attn.o_norm.weight == 1) and torch.all(attn.g_proj[1].bias == 0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


@pytest.fixture
def tiny_arcee_teacher(tmp_path):
    """A random Arcee teacher: ungated ReLU^2 MLP, GQA, YaRN RoPE (AFM's family, tiny)."""
    config = ArceeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, architectures=["ArceeForCausalLM"],
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 32},
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    ArceeForCausalLM(config).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_arcee_teacher_reproduced_and_converted(tiny_arcee_teacher, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_arcee_teacher).eval()
    ids = torch.randint(0, 101, (2, 100), generator=torch.Generator().manual_seed(0))
    convert_teacher(tiny_arcee_teacher, "teacher", tmp_path / "same")
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, teacher(ids).logits, rtol=0, atol=1e-5)

    report = convert_teacher(tiny_arcee_teacher, "3:1", tmp_path / "hybrid")
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert hybrid.config.layer_types == ["kda", "kda", "kda", "full_nope"]
    assert not hybrid.config.mlp_gated and hybrid.config.hidden_act == "relu2"
    assert report.total == sum(p.numel() for p in hybrid.parameters())
    t = teacher.model.layers[1].self_attn.v_proj.weight.view(2, 16, 64)
    s = hybrid.model.layers[1].self_attn.v_proj.weight.view(4, 16, 64)
    assert all(torch.equal(s[j], t[j // 2]) for j in range(4))
    assert torch.equal(hybrid.model.layers[3].self_attn.k_proj.weight,
                       teacher.model.layers[3].self_attn.k_proj.weight)
    assert torch.equal(hybrid.model.layers[2].mlp.up_proj.weight,
                       teacher.model.layers[2].mlp.up_proj.weight)
    with torch.no_grad():
        assert torch.isfinite(hybrid(ids).logits).all()


def test_dry_run_on_afm_shaped_teacher(tmp_path):
    afm_config().save_pretrained(tmp_path)
    result = CliRunner().invoke(student, ["init", "--teacher", str(tmp_path), "--pattern", "kda",
                                          "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "ArceeForCausalLM, 4,619,184,640 parameters" in result.output
    assert re.search(r"^total\s+5,046,996,688", result.output, re.M)
    _, report = plan_student(tmp_path, "3:1")
    assert round(report.total / 1e9, 2) == 4.94


def test_unsupported_teacher_is_named(tmp_path):
    MistralConfig(architectures=["MistralForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="MistralForCausalLM is not supported"):
        plan_student(tmp_path, "3:1")


def test_refuses_to_overwrite(teacher_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        convert_teacher(teacher_dir, "kda", tmp_path)
