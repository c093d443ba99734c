"""Training never reads a corrupt shard: every shard is checked whole against the manifest's
sha256 before its values can reach a loss. By default the run stops with a message naming
the shard; with ``data.on_corrupt_shard=skip`` it trains without it, says so (log,
metrics.jsonl, summary, checkpoints), and a resumed run still equals an uninterrupted one.
All ranks agree on what is left out even when only one of them checked the shard."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdpipe.compress import Dataset
from kdpipe.schemas import DatasetError
from kdpipe.student_train.stream_loader import build_index
from test_train_fixtures import finish_or_fail, tiny_config, write_training_inputs

LAUNCH = "from kdpipe.cli import main; main()"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_training_inputs(tmp_path_factory.mktemp("corrupt"))


@pytest.fixture
def data(inputs, tmp_path):
    """A private copy of the dataset, to damage."""
    shutil.copytree(inputs / "ds", tmp_path / "ds")
    return tmp_path / "ds"


def _shard(data: Path, i: int = 1) -> Path:
    return data / Dataset(str(data)).shards[i].file


def _flip_in_footer_text(path: Path) -> None:
    """Flip a bit of the writer's name in the footer: nothing the page checksums, schema or
    codec checks look at, so only the whole-file sha256 can notice."""
    data = bytearray(path.read_bytes())
    data[data.rindex(b"parquet-cpp-arrow") + 3] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_random_byte(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _train_cmd(inputs, out: Path, data: Path, **sets) -> list[str]:
    cmd = [sys.executable, "-c", LAUNCH, "train"]
    for s in tiny_config(out, data, inputs / "student", **sets):
        cmd += ["--set", s]
    return cmd


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_flip_that_page_checksums_miss_is_caught_by_the_sha256(data):
    shard = _shard(data)
    _flip_in_footer_text(shard)
    ds = Dataset(str(data))
    entry = ds.shards[1]
    pf = ds.open_shard(entry)                  # the checks without the sha256 see nothing
    for rg in range(pf.num_row_groups):
        ds.read_row_group(entry, pf, rg)
    with pytest.raises(DatasetError, match="sha256") as e:
        build_index(ds)
    assert str(shard) in str(e.value)
    index = build_index(ds, on_corrupt="skip")
    assert list(index.skipped) == [entry.file]
    assert index.num_documents == ds.manifest.documents - entry.documents


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_default_run_refuses_a_corrupt_shard_naming_it(inputs, data, tmp_path, damage):
    shard = _shard(data)
    if damage == "flip":
        _flip_random_byte(shard, seed=3)
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    result = subprocess.run(_train_cmd(inputs, tmp_path, data), env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert str(shard) in result.stderr, result.stderr[-3000:]
    assert "corrupt" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()       # not a single step trained


def test_skip_trains_without_the_shard_and_reports_it(inputs, data, tmp_path):
    shard = _shard(data)
    _flip_in_footer_text(shard)
    entry = Dataset(str(data)).shards[1]
    result = subprocess.run(_train_cmd(inputs, tmp_path, data, **{
        "data.on_corrupt_shard": "skip", "train.max_steps": 4}), env=_env(),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped 1 corrupt shard(s): {entry.file}" in result.stdout
    assert str(shard) in result.stderr and "sha256" in result.stderr       # the log's warning
    records = _records(tmp_path / "run")
    (data_record,) = [r for r in records if r["kind"] == "data"]
    assert data_record["skipped_shards"] == 1 and data_record["skipped_files"] == [entry.file]
    assert data_record["skipped_documents"] == entry.documents
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "meta.json")
                      .read_text())
    assert list(meta["skipped_shards"]) == [entry.file]


def test_resume_after_a_skip_equals_the_uninterrupted_run(inputs, data, tmp_path):
    """The resumed run leaves the shard out again (unchecked, even once restored), so its
    data order, losses, held-out metrics and weights are those of the uninterrupted run."""
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer

    shard = _shard(data)
    original = shard.read_bytes()
    _flip_random_byte(shard, seed=5)
    sets = {"data.on_corrupt_shard": "skip", "train.max_steps": 8, "checkpoint.every": 3,
            "checkpoint.keep_last": 5, "eval.every": 4}
    full = tmp_path / "full"
    Trainer(load_config(None, tiny_config(full, data, inputs / "student",
                                          heldout=inputs / "held", **sets))).train()

    # what a run killed between the checkpoints of steps 3 and 6 leaves on disk
    resumed = tmp_path / "resumed"
    (resumed / "run" / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(full / "run" / name, resumed / "run" / name)
    shutil.copytree(full / "run" / "checkpoints" / "step-00000003",
                    resumed / "run" / "checkpoints" / "step-00000003")
    shard.write_bytes(original)                                    # restored meanwhile
    summary = Trainer(load_config(None, tiny_config(resumed, data, inputs / "student",
                                                    heldout=inputs / "held", **sets)),
                      resume=True).train()
    assert summary["skipped_shards"] == [Dataset(str(data)).shards[1].file]

    timed = ("tokens_per_s", "stage_s")
    untimed = [{k: v for k, v in r.items() if k not in timed} for r in _records(full / "run")]
    assert untimed == [{k: v for k, v in r.items() if k not in timed}
                       for r in _records(resumed / "run")]
    wa = load_file(full / "run" / "final" / "model.safetensors")
    wb = load_file(resumed / "run" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_shard_that_went_bad_after_the_checkpoint(inputs, data, tmp_path):
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer

    sets = tiny_config(tmp_path, data, inputs / "student",
                       **{"data.on_corrupt_shard": "skip", "train.max_steps": 2})
    Trainer(load_config(None, sets)).train()
    _flip_in_footer_text(_shard(data))
    with pytest.raises(DatasetError, match="change the run's data order"):
        Trainer(load_config(None, sets), resume=True)


def test_two_ranks_agree_on_a_shard_only_one_of_them_checked(inputs, data, tmp_path):
    """Rank r hashes shards r, r+2, ...: shard 1 is hashed by rank 1 alone, and the damage
    is invisible to rank 0's lighter checks. Both ranks must still leave it out."""
    _flip_in_footer_text(_shard(data, 1))
    launch = tmp_path / "launch.py"
    launch.write_text(LAUNCH + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(launch), "train"]
    for s in tiny_config(tmp_path, data, inputs / "student", **{
            "data.on_corrupt_shard": "skip", "train.max_steps": 3, "parallel.backend": "gloo",
            "parallel.strategy": "ddp"}):
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out, err = finish_or_fail(proc, 300, "the ranks did not finish: disagreement on the "
                                         "skipped shard deadlocks")
    assert proc.returncode == 0, err[-4000:]
    (record,) = [r for r in _records(tmp_path / "run") if r["kind"] == "data"]   # rank 0's
    assert record["skipped_files"] == [Dataset(str(data)).shards[1].file]
    assert len([r for r in _records(tmp_path / "run") if r["kind"] == "train"]) == 3
