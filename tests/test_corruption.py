"""Random bit flips and truncations in shards, manifest and fragments: verify names each file.

The full 1000-trial run is bench/bench_corruption.py; this runs a reduced count.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from kdpipe.schemas import DatasetError, Manifest
from tests.test_dataset_io import _doc, _write

_spec = importlib.util.spec_from_file_location(
    "bench_corruption", Path(__file__).resolve().parents[1] / "bench" / "bench_corruption.py")
bench_corruption = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_corruption)


def test_every_damage_is_detected_and_named(tmp_path):
    rng = np.random.default_rng(5)
    _write(tmp_path / "ds", [_doc(i, rng) for i in range(11)])
    result = bench_corruption.run_trials(tmp_path / "ds", trials=120, seed=1)
    assert set(result["by_kind"]) == {"shard", "manifest", "fragment"}
    assert result["missed"] == []


def test_manifest_checksum_catches_a_valid_json_edit(tmp_path):
    rng = np.random.default_rng(6)
    _write(tmp_path / "ds", [_doc(i, rng) for i in range(3)])
    path = tmp_path / "ds" / "manifest.json"
    path.write_text(path.read_text().replace('"name": "kdpipe"', '"name": "kdpipf"'))
    with pytest.raises(DatasetError, match="manifest.json.*checksum mismatch"):
        Manifest.from_json(path.read_bytes(), str(path))
