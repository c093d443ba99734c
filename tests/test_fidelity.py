"""The fidelity report: keys, exact rows as the zero point, plot, refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kdpipe.compress import Dataset
from kdpipe.compress.cli import fidelity_cmd
from kdpipe.compress.fidelity import evaluate, load_sample
from kdpipe.schemas import CodecConfig, ConfigError

from test_codec_facade import make_documents, write_dataset

KEYS = {"codec", "bytes_per_token", "kl_topk_mean", "kl_topk_p99", "kl_full_mean",
        "abs_logprob_err_mean", "top1_agreement", "encode_tokens_per_s", "decode_tokens_per_s"}


def test_fidelity_command_writes_table_json_and_plot(tmp_path):
    src = write_dataset(tmp_path / "kd", make_documents(10, seed=12))
    result = CliRunner().invoke(fidelity_cmd, [
        src, "--codecs", "exact,default,small,distillkit-budget", "--json",
        str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    assert "| default |" in result.output
    rows = {r["codec"]: r for r in json.loads((tmp_path / "f.json").read_text())}
    assert set(rows) == {"exact", "default", "small", "distillkit-budget"}
    for r in rows.values():
        assert KEYS <= set(r)
    exact = rows["exact"]
    assert exact["bytes_per_token"] == 8 * 128
    assert exact["kl_topk_mean"] == 0 and exact["abs_logprob_err_mean"] == 0
    assert exact["top1_agreement"] == 1 and abs(exact["kl_full_mean"]) < 1e-9
    assert exact["hidden_cosine"] == 1
    assert 0 < rows["default"]["kl_topk_mean"] < 1e-3
    assert rows["default"]["bytes_per_token"] < rows["exact"]["bytes_per_token"] / 3
    # truncating 128 -> 50 costs far more in the full distribution than in the top-k
    assert rows["small"]["kl_full_mean"] > 10 * rows["small"]["kl_topk_mean"]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lowrank_is_fitted_on_other_documents_than_it_is_scored_on(tmp_path):
    sample = load_sample(Dataset(write_dataset(tmp_path / "kd", make_documents(12, seed=13))))
    full = CodecConfig.from_dict({"name": "lr", "ids": "int32", "values": "float32",
                                  "hidden": {"kind": "lowrank", "rank": 48,
                                             "coeff_dtype": "bfloat16"}})
    row = evaluate(sample, full, calibration_tokens=40)
    assert row.hidden_bytes_per_token_layer == 96
    assert row.hidden_cosine > 0.99        # full rank: only bf16 rounding is lost


def test_fidelity_needs_an_exact_dataset(tmp_path):
    src = write_dataset(tmp_path / "kd", make_documents(3, seed=14), "default")
    with pytest.raises(ConfigError, match="exact"):
        load_sample(Dataset(src))
