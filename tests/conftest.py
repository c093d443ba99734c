"""Shared fixtures: the real embedded teacher and a small local corpus.

KDPIPE_CACHE defaults to the user's cache so the one-time teacher conversion
(~25 s) is shared between test runs, `make capture` and `make demo`.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def teacher_dir():
    from kdpipe.capture.teacher import prepare_embedded_teacher
    return prepare_embedded_teacher()
