"""The reading recipes of docs/format.md, run verbatim against a real capture."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from kdpipe.compress import Dataset
from tests.helpers import capture_small

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def example(name: str) -> str:
    """The code block that follows ``<!-- example: NAME -->`` in docs/format.md."""
    m = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"docs/format.md has no example {name!r}"
    return m.group(1)


def test_documented_readers_open_a_real_dataset(tmp_path, teacher_dir):
    # bfloat16 hidden states: the layout numpy needs the most care with
    ds = capture_small(tmp_path / "ds", teacher_dir, n_docs=3, top_k=6, hidden_layers="0,30",
                       dtype="bfloat16")
    assert Dataset(str(ds)).manifest.teacher.dtype == "bfloat16"
    decoded = list(Dataset(str(ds)).iter_documents())
    script = "\n".join([
        "import json",
        f"DATASET = {str(ds)!r}",
        example("datasets"),
        example("pyarrow"),
        "manifest = json.load(open(f'{DATASET}/manifest.json'))",
        "out = []",
        "for row in table.to_pylist():",
        textwrap.indent(example("exact"), "    "),
        "    out.append({'doc_id': row['doc_id'], 'ids': ids.tolist(),",
        "                'logprobs': logprobs.tolist(), 'hidden': hidden.tolist()})",
        "print(json.dumps({'datasets': list(ds['doc_id']), 'rows': out}))",
    ])
    # a separate interpreter, so the datasets cache can go to tmp_path
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["datasets"] == [d.doc_id for d in decoded]
    assert [r["doc_id"] for r in got["rows"]] == [d.doc_id for d in decoded]
    for row, doc in zip(got["rows"], decoded):
        assert np.array_equal(np.array(row["ids"]), doc.topk_ids.numpy())
        assert np.array_equal(np.array(row["logprobs"], np.float32), doc.topk_logprobs.numpy())
        assert np.array_equal(np.array(row["hidden"], np.float32), doc.hidden[0].numpy())
