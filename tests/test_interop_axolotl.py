"""Export to axolotl's KD form, checked by a reader written from its documented rules."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from kdpipe.compress import Dataset
from kdpipe.compress.cli import export

from test_codec_facade import make_documents, write_dataset

COLUMNS = ["input_ids", "labels", "attention_mask", "target_token_ids", "target_logprobs",
           "target_mask"]


def check_axolotl_row(row: dict) -> None:
    """axolotl's rules: per-token lists of one length T, K slots per row, row j describes
    input_ids[j + 1], target_mask[j] is 0 where labels[j + 1] == -100 and on the last
    row, padded slots carry a large negative log-prob under a zero mask."""
    t = len(row["input_ids"])
    assert all(len(row[c]) == t for c in COLUMNS)
    ks = {len(r) for c in ("target_token_ids", "target_logprobs", "target_mask")
          for r in row[c]}
    assert len(ks) == 1
    assert set(row["attention_mask"]) == {1}
    for j in range(t):
        mask = row["target_mask"][j]
        assert set(mask) <= {0, 1}
        if j == t - 1 or row["labels"][j + 1] == -100:
            assert not any(mask)
        for m, lp in zip(mask, row["target_logprobs"][j]):
            if m:
                assert -1e4 < lp <= 0


def test_axolotl_export_follows_the_documented_layout(tmp_path):
    docs = make_documents(8, seed=11)
    src = write_dataset(tmp_path / "kd", docs)
    result = CliRunner().invoke(export, ["--format", "axolotl", src, str(tmp_path / "ax")])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "ax" / "data_0.parquet").to_pylist()
    decoded = list(Dataset(src).iter_documents(hidden_layers=[]))
    assert len(rows) == len(decoded) == 8
    for row, doc in zip(rows, decoded):
        check_axolotl_row(row)
        t = doc.num_tokens
        assert row["input_ids"] == doc.input_ids.tolist()
        trained = np.ones(t, bool) if doc.loss_mask is None else doc.loss_mask
        has_row = np.ones(t, bool) if doc.teacher_mask is None else doc.teacher_mask
        assert [lab == -100 for lab in row["labels"][1:]] == (~trained[:-1]).tolist()
        r = 0
        for j in range(t):
            if not has_row[j]:
                assert row["target_logprobs"][j] == [-1e9] * len(row["target_logprobs"][j])
                assert not any(row["target_mask"][j])
                continue
            assert row["target_token_ids"][j] == doc.topk_ids[r].tolist()
            np.testing.assert_array_equal(np.float32(row["target_logprobs"][j]),
                                          doc.topk_logprobs[r].numpy())
            assert any(row["target_mask"][j]) == bool(trained[j] and j < t - 1)
            r += 1
