"""The Triton top-k kernels, run by Triton's interpreter on the CPU, against float64.

The same kernels compile for CUDA in ``test_capture_gpu.py``; here their logic (keys, group
ranking, candidate layout, padding past the vocabulary, k rounded up to a power of two) is
checked on every machine that has Triton installed. Triton reads ``TRITON_INTERPRET`` when it
wraps a function, its own library's included, so the checks run in a fresh interpreter.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

# vocab, k, group: k a power of two or not, the last group full or running past the vocabulary
CASES = [(2048, 8, 16), (1203, 5, 32), (700, 1, 16)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def check_interpreted() -> None:
    """Every case against the torch path and float64; run with ``TRITON_INTERPRET=1``."""
    from kdpipe.capture import topk
    from kdpipe.capture import topk_kernel as kernels
    from tests.helpers import assert_exact_topk, tied_logits
    for (vocab, k, group), dtype in itertools.product(CASES, DTYPES):
        print(f"vocab {vocab}, top-{k}, groups of {group}, {dtype}", flush=True)
        x = tied_logits(215, vocab, dtype, seed=vocab)[::14]     # every kind of row, 16
        logsum, gmax = kernels.logsum_and_group_max_cuda(x, group)
        want_logsum, want_gmax = topk.logsum_and_group_max(x, group)
        assert torch.equal(gmax, want_gmax)
        torch.testing.assert_close(logsum, want_logsum, atol=2e-6, rtol=1e-6)
        assert kernels.select_fits(k, gmax.shape[1], group)
        assert_exact_topk(x, *kernels.select_topk_cuda(x, logsum, gmax, k, group))


def test_kernels_give_the_exact_topk_in_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", "from tests.test_topk_kernel import check_interpreted as c; c()"],
        cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]


def test_shapes_the_kernel_does_not_take():
    from kdpipe.capture.topk_kernel import select_fits
    assert select_fits(128, 2001, 64)                 # AFM's vocabulary in groups of 64
    assert not select_fits(128, 127, 64)              # fewer groups than k
    assert not select_fits(100, 127, 64)              # ... than k rounded up to a power of two
    assert not select_fits(1025, 2001, 64)            # candidates beyond the registers' bound
    assert not select_fits(128, 32769, 4)             # groups beyond it
