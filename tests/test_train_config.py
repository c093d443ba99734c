"""Training config: YAML + --set overrides, unknown keys refused with the valid ones listed,
the reference config documenting every key, the recipes loading, the schedule, and the
checks that stop a run before step 1 when the dataset does not fit the student."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from kdpipe.schemas import ConfigError
from kdpipe.schemas.convert import from_data
from kdpipe.student_train.train_config import Config, load_config
from kdpipe.student_train.trainer import freeze, frozen_linears_to_bf16, lr_multiplier
from test_train_fixtures import tiny_config, write_dataset, write_student

CONFIGS = Path(__file__).resolve().parents[1] / "student_train" / "configs"


def _keys(cls, prefix=""):
    out = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out |= _keys(type(default), f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def _yaml_keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _yaml_keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_reference_config_documents_every_key_with_its_default():
    raw = yaml.safe_load((CONFIGS / "reference.yaml").read_text())
    assert _yaml_keys(raw) == _keys(Config)
    defaults = Config().to_dict()
    documented = from_data(Config, raw).to_dict()
    differ = {f"{s}.{k}" for s in defaults if isinstance(defaults[s], dict)
              for k in defaults[s] if defaults[s][k] != documented[s][k]}
    assert differ == {"student.teacher", "train.max_steps"}     # set so the file runs as is


@pytest.mark.parametrize("name", ["reference", "demo", "stage1", "stage1-all-layers", "stage2"])
def test_recipes_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.loss.terms


def test_stage1_is_the_blog_recipe():
    cfg = load_config(CONFIGS / "stage1.yaml")
    terms = {(t.kind, t.weight, t.temperature) for t in cfg.loss.terms}
    assert terms == {("ce", 0.2, 1.0), ("kl", 0.2, 2.0), ("hidden_cosine", 0.6, 1.0)}
    assert cfg.loss.layer_map == "all" and cfg.data.seq_len == 2048
    assert cfg.train.gradient_checkpointing and cfg.optim.max_grad_norm == 0.5
    assert load_config(CONFIGS / "stage2.yaml").data.seq_len == 32768


def test_set_overrides_and_unknown_keys():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.max_steps=7", "loss.terms.0.weight=0.5",
                                              "optim.betas=[0.8, 0.9]", "eval.data=null",
                                              "optim.lr=3e-3"])
    assert cfg.train.max_steps == 7 and cfg.loss.terms[0].weight == 0.5
    assert cfg.optim.betas == [0.8, 0.9] and cfg.eval.data is None and cfg.optim.lr == 0.003
    with pytest.raises(ConfigError, match=r"train has no key 'max_stepz'; valid keys: max_steps"):
        load_config(CONFIGS / "demo.yaml", ["train.max_stepz=1"])
    with pytest.raises(ConfigError, match="no key 'bogus'; valid keys: out, student, data"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="is a list of 2 entries"):
        load_config(CONFIGS / "demo.yaml", ["loss.terms.5.weight=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(CONFIGS / "demo.yaml", ["train.max_steps"])


def test_unknown_keys_in_yaml_are_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student: {teacher: embedded}\ntrain: {max_steps: 3, lr: 1}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(f))}: train: unknown key 'lr'; valid keys: max_steps"):
        load_config(f)
    f.write_text("student: {teacher: embedded}\ntrain: {max_steps: 3}\n"
                 "loss: {terms: [{kind: kl, temp: 2}]}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(f))}: loss.terms\[0\]: unknown key 'temp'; "
                                          r"valid keys: kind, weight, temperature, missing"):
        load_config(f)


def test_wrong_types_name_the_file_and_the_key_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student: {teacher: embedded}\ntrain: {max_steps: 3}\n"
                 "loss: {terms: [{kind: kl}, {kind: ce}, {kind: kl, weight: abc}]}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: loss.terms\[2\].weight: "
                                          r"expected a number, got 'abc'$"):
        load_config(f)
    f.write_text("student: {teacher: embedded}\ntrain: {max_steps: 3.5, gradient_checkpointing: "
                 "yes please}\n")
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got 3.5$"):
        load_config(f)
    f.write_text("student: {teacher: embedded}\ntrain: {max_steps: 3}\noptim: {lr: 3e-3}\n")
    assert load_config(f).optim.lr == 0.003                # YAML 1.2: a number, not a string
    with pytest.raises(ConfigError, match=r"^--set: train.gradient_checkpointing: expected true "
                                          r"or false, got 'yes please'$"):
        load_config(f, ["train.gradient_checkpointing=yes please"])
    with pytest.raises(ConfigError, match=r"^--set: student.pattern: expected a string, got 181"):
        load_config(f, ["student.pattern=3:1"])          # YAML 1.1 reads 3:1 as 181


@pytest.mark.parametrize("override,match", [
    ("loss.terms.0.kind=kld", "unknown loss 'kld'"),
    ("loss.terms.0.temperature=0", "must be positive"),
    ("loss.missing=uniform", "loss.missing must be one of zero, tail"),
    ("data.packing=greedy", "data.packing must be one of whole, concat"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("student.path=somewhere", "exactly one of student.path"),
])
def test_invalid_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "demo.yaml", [override])


def test_lr_schedule():
    f = dict(warmup=4, total=20, min_ratio=0.1, schedule="cosine")
    assert [lr_multiplier(s, **f) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **f) == 1.0
    assert lr_multiplier(12, **f) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_multiplier(20, **f) == pytest.approx(0.1) and lr_multiplier(50, **f) == \
        pytest.approx(0.1)
    assert lr_multiplier(10, **dict(f, schedule="constant")) == 1.0


def test_frozen_patterns(tmp_path):
    from kdpipe.student_train.evaluate import load_student
    student = load_student(str(write_student(tmp_path / "s")))
    trainable, frozen = freeze(student, ["embed_tokens", r"^model\.layers\.\d+\.mlp\."])
    names = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert all("mlp" in n or "embed" in n for n in names) and trainable > 0 and frozen > 0
    with pytest.raises(ConfigError, match="match no parameter"):
        freeze(student, ["no_such_module"])
    with pytest.raises(ConfigError, match="not a valid regex"):
        freeze(student, ["(unclosed"])


def test_frozen_linears_in_bf16_change_no_number(tmp_path):
    """Frozen linears that bf16 holds exactly are stored in bf16: under bf16 autocast the
    logits and the trainable gradients stay bitwise equal; an inexact or embedding-shared
    weight stays float32."""
    import copy

    from kdpipe.student_train.evaluate import load_student
    student = load_student(str(write_student(tmp_path / "s")))
    with torch.no_grad():                                   # as converted from a bf16 teacher
        for p in student.parameters():
            p.copy_(p.bfloat16().float())
        student.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-4   # not exact in bf16
    freeze(student, ["embed_tokens", "lm_head", r"^model\.layers\.\d+\.mlp\."])
    packed = copy.deepcopy(student)
    saved = frozen_linears_to_bf16(packed)
    mlps = [m for layer in packed.model.layers for m in (layer.mlp.up_proj, layer.mlp.down_proj)]
    assert [m.weight.dtype for m in mlps] == [torch.float32] + [torch.bfloat16] * (len(mlps) - 1)
    assert packed.lm_head.weight.dtype == torch.bfloat16
    assert packed.model.embed_tokens.weight.dtype == torch.float32
    assert saved == 2 * sum(m.weight.numel() for m in mlps[1:] + [packed.lm_head])
    x = torch.randint(0, student.config.vocab_size, (1, 12))
    outs = []
    for model in (student, packed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, labels=x)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters()
                                  if p.requires_grad}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[0][1].items():
        assert torch.equal(g, outs[1][1][name]), name


# -- the dataset must fit the student before step 1 --------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checks")
    write_dataset(tmp / "ds", n_docs=6)
    write_student(tmp / "student")
    return tmp


def _trainer(tmp, toy, *sets, student=None):
    from kdpipe.student_train.trainer import Trainer
    cfg = load_config(None, tiny_config(tmp, toy / "ds", student or toy / "student") + list(sets))
    return Trainer(cfg)


def test_vocabulary_mismatch_names_both_sides(toy, tmp_path):
    from test_train_fixtures import VOCAB
    import kdpipe.student_train  # noqa: F401
    from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM
    cfg = KDAHybridConfig(vocab_size=VOCAB + 1, hidden_size=16, intermediate_size=16,
                          num_hidden_layers=1, num_attention_heads=2, layer_types=["full_nope"])
    KDAHybridForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match=rf"vocab_size {VOCAB}, student .*wide has vocab_size "
                                          rf"{VOCAB + 1}"):
        _trainer(tmp_path, toy, student=tmp_path / "wide")


def test_codec_mismatch_names_both_sides(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"encoded with 'exact' .*requires 'default'"):
        _trainer(tmp_path, toy, "data.codec=default")


def test_missing_hidden_layers_name_both_sides(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher layer 7, dataset .* captured only \[0, 1, 2\]"):
        _trainer(tmp_path, toy, "loss.terms=[{kind: hidden_cosine}]", "loss.layer_map=[[1, 7]]")
    with pytest.raises(ConfigError, match=r"student layer 5, student .* has layers 0..2"):
        _trainer(tmp_path, toy, "loss.terms=[{kind: hidden_mse}]", "loss.layer_map=[[5, 1]]")
    with pytest.raises(ConfigError, match=r"hidden_size 16, student .* has 32"):
        _trainer(tmp_path, toy, "loss.terms=[{kind: hidden_mse}]", "loss.projection=none")


def test_tokenizer_is_checked(toy, tmp_path, teacher_dir):
    from transformers import AutoTokenizer
    with pytest.raises(ConfigError, match="has no tokenizer to compare"):
        _trainer(tmp_path, toy, "data.check_tokenizer=true")
    student = tmp_path / "with-tok"
    write_student(student)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(student)
    with pytest.raises(ConfigError, match=r"captured with tokenizer 111111111111\.\.\., student "
                                          r".*with-tok has [0-9a-f]{12}\.\.\."):
        _trainer(tmp_path, toy, "data.check_tokenizer=true", student=student)


def test_heldout_from_another_teacher_is_refused(toy, tmp_path):
    import json

    from kdpipe.schemas import Manifest
    other = tmp_path / "other"
    write_dataset(other, n_docs=3)
    m = json.loads((other / "manifest.json").read_text())
    m["teacher"]["config_sha256"] = "f" * 64
    (other / "manifest.json").write_text(Manifest.from_dict(m).to_json())
    with pytest.raises(ConfigError, match="held-out data comes from another teacher"):
        _trainer(tmp_path, toy, f"eval.data={other}")
