"""Shared fixtures: the real embedded teacher and a small local corpus.

KDPIPE_CACHE defaults to the user's cache so the one-time teacher conversion
(~25 s) is shared between test runs, `make capture` and `make demo`.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton benchmarks every candidate config of an autotuned kernel once per key and process;
# fla's KDA kernels have dozens each, and the GPU tests' many small shapes and dtypes spent
# most of their time there. Tests check values, not speed: they try at most this many configs
# (spread over each kernel's list; KDPIPE_TEST_AUTOTUNE_CONFIGS=0 tries them all).
AUTOTUNE_CONFIGS = int(os.environ.get("KDPIPE_TEST_AUTOTUNE_CONFIGS", "2"))


def _restrict_autotuning(limit: int) -> None:
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs

    def few_configs(self, *args, **kwargs):
        configs = prune(self, *args, **kwargs)
        if len(configs) <= limit:
            return configs
        step = len(configs) / limit
        return [configs[int(step * i + step / 2)] for i in range(limit)]

    Autotuner.prune_configs = few_configs


def pytest_configure(config):
    if torch.cuda.is_available() and AUTOTUNE_CONFIGS > 0:
        _restrict_autotuning(AUTOTUNE_CONFIGS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``kdpipe fidelity`` sets torch's CPU threads for its timings; tests run after it in the
    same process must not inherit its count (float32 forwards differ across thread counts)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def teacher_dir():
    from kdpipe.capture.teacher import prepare_embedded_teacher
    return prepare_embedded_teacher()
