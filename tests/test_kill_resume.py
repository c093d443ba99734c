"""Capture killed with SIGKILL at random moments, rerun each time: the result equals an
uninterrupted run. bench/bench_kill_resume.py runs 20 kills; the suite runs 3."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import docstring_texts, write_jsonl

_spec = importlib.util.spec_from_file_location(
    "bench_kill_resume", Path(__file__).resolve().parents[1] / "bench" / "bench_kill_resume.py")
bench_kill_resume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kill_resume)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_random_kills_then_resume_equal_uninterrupted(tmp_path, teacher_dir, writer):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docstring_texts(10, 250)])
    extra = ("--max-seq-len 48 --top-k 8 --window 2 --docs-per-shard 2 --hidden-layers 0,30 "
             f"--writer {writer}")
    r = bench_kill_resume.run(str(teacher_dir), data, extra.split(), kills=3, seed=7,
                              work=tmp_path)
    assert r["kills"] == 3                      # every kill landed mid-capture
    assert r["same_arrays"] and r["same_shards"] and r["same_records"], r["rounds"]
    assert r["documents"] == 10
