"""Layer patterns, config validation and parameter counts (AFM-4.5B shapes, nothing allocated)."""

from __future__ import annotations

import pytest

from bench.afm import afm_4p5b_config
from kdpipe.schemas import ConfigError
from kdpipe.student_train import KDAHybridConfig, parse_layer_pattern
from kdpipe.student_train.model.convert import count_parameters, student_config_from_teacher
from kdpipe.student_train.model.layers.kda import KimiDeltaAttention


def afm_config():
    return afm_4p5b_config()


def full_layers(types):
    return [i for i, t in enumerate(types) if t != "kda"]


def test_three_to_one_pattern():
    types = parse_layer_pattern("3:1", 36)
    assert full_layers(types) == list(range(3, 36, 4))
    assert set(types) == {"kda", "full_nope"}
    # 30 layers: every 4th, and the last one is full attention too
    assert full_layers(parse_layer_pattern("3:1", 30)) == [3, 7, 11, 15, 19, 23, 27, 29]


def test_named_letter_and_list_patterns():
    assert parse_layer_pattern("kda", 3) == ["kda"] * 3
    assert parse_layer_pattern("teacher", 2) == ["full_rope"] * 2
    assert parse_layer_pattern("KKFR", 4) == ["kda", "kda", "full_nope", "full_rope"]
    assert parse_layer_pattern("kda, full_rope", 2) == ["kda", "full_rope"]
    assert parse_layer_pattern(["full_nope", "kda"], 2) == ["full_nope", "kda"]


@pytest.mark.parametrize("pattern,match", [
    ("KKF", "3 entries but the model has 4"), ("KKXF", "unknown layer pattern"),
    ("kda,mamba,kda,kda", "unknown layer type"), ("", "unknown layer pattern"),
    ("0:1", "at least 1:1")])
def test_bad_patterns(pattern, match):
    with pytest.raises(ConfigError, match=match):
        parse_layer_pattern(pattern, 4)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown layer type"):
        KDAHybridConfig(num_hidden_layers=2, layer_types=["kda", "attention"])
    with pytest.raises(ConfigError, match="kda_backend"):
        KDAHybridConfig(kda_backend="triton")
    with pytest.raises(ConfigError, match="multiple of"):
        KDAHybridConfig(num_attention_heads=6, num_key_value_heads=4)


def test_kda_layer_matches_fla_parameter_count():
    import torch
    with torch.device("meta"):
        layer = KimiDeltaAttention(2560, 20, 128)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                     "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "f_proj.0.weight",
                     "f_proj.1.weight", "b_proj.weight", "A_log", "dt_bias", "g_proj.0.weight",
                     "g_proj.1.weight", "g_proj.1.bias", "o_norm.weight"}
    assert round(sum(p.numel() for p in layer.parameters()) / 1e6, 1) == 27.6


def test_afm_shaped_parameter_counts_without_allocating():
    teacher = afm_config()
    assert round(count_parameters(teacher) / 1e9, 2) == 4.62
    assert round(count_parameters(student_config_from_teacher(teacher, "3:1")) / 1e9, 2) == 4.94
    assert round(count_parameters(student_config_from_teacher(teacher, "kda")) / 1e9, 2) == 5.05
    same = student_config_from_teacher(teacher, "teacher")
    assert count_parameters(same) == count_parameters(teacher)
