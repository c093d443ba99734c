"""Training SIGKILLed at random moments, resumed with --resume each time: losses, held-out
metrics and final weights equal the uninterrupted run's bitwise.
bench/bench_train_kill_resume.py runs 20 kills; the suite runs 3."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_train_kill_resume",
    Path(__file__).resolve().parents[1] / "bench" / "bench_train_kill_resume.py")
bench_train_kill_resume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train_kill_resume)


@pytest.mark.slow
def test_random_kills_then_resume_equal_uninterrupted(tmp_path):
    r = bench_train_kill_resume.run(kills=3, seed=1, work=tmp_path, steps=12)
    assert r["kills_landed"] >= 1                   # at least one kill landed mid-run
    assert r["result"] == "PASS", r                 # losses, eval, weights; idempotent rerun
