"""Training never costs a user data: ``--overwrite`` deletes only a run kdpipe wrote, after
the config and the data are checked; cheap checks come before converting a student; what a
run writes is group-readable and loads with transformers; the commands say what they do."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdpipe.cli import cli
from kdpipe.schemas import ConfigError
from kdpipe.student_train.model.convert import check_student_out, convert_teacher
from kdpipe.student_train.run_dir import MARKER
from kdpipe.student_train.train_config import load_config
from kdpipe.student_train.trainer import Trainer
from test_student_convert import tiny_arcee_teacher  # noqa: F401  (a fixture)
from test_train_fixtures import tiny_config, write_training_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = write_training_inputs(tmp_path_factory.mktemp("mistakes"), n_docs=12, n_held=3)
    (tmp / "ds" / "notes.txt").write_text("my notes\n")
    (tmp / "notes.txt").write_text("notes beside the data\n")
    return tmp


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _train(inputs: Path, out: Path | str, *args: str, **sets) -> object:
    argv = ["train", *args]
    for s in tiny_config(inputs, inputs / "ds", inputs / "student", heldout=inputs / "held",
                         **{"out": str(out), "train.max_steps": 2, **sets}):
        argv += ["--set", s]
    return CliRunner().invoke(cli, argv)


@pytest.mark.parametrize("target,key", [("ds", "data.path"), ("held", "eval.data"),
                                        ("student", "student.path"), (".", "data.path")])
def test_overwrite_refuses_an_input_or_a_directory_above_one(inputs, target, key):
    before = _files(inputs)
    result = _train(inputs, inputs / target, "--overwrite")
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError), result.output
    assert key in str(result.exception) and "must not hold an input" in str(result.exception)
    assert _files(inputs) == before                   # dataset, notes, student untouched


def test_overwrite_refuses_the_working_directory(inputs, tmp_path, monkeypatch):
    cwd = tmp_path / "project" / "src"
    cwd.mkdir(parents=True)
    (cwd / "mine.txt").write_text("x")
    monkeypatch.chdir(cwd)
    for out in (".", ".."):
        result = _train(inputs, out, "--overwrite")
        assert isinstance(result.exception, ConfigError), result.output
        assert "working directory" in str(result.exception)
    result = _train(inputs, ".")                      # without --overwrite: not a run
    assert "not a kdpipe training run" in str(result.exception)
    assert _files(tmp_path) == {"project/src/mine.txt": b"x"}


def test_overwrite_replaces_only_a_run_holding_nothing_foreign(inputs, tmp_path):
    run = tmp_path / "run"
    assert _train(inputs, run).exit_code == 0
    assert (run / MARKER).exists() and (run / "final" / "model.safetensors").exists()
    (run / "notes.txt").write_text("mine")
    result = _train(inputs, run, "--overwrite")
    assert "notes.txt" in str(result.exception) and (run / "notes.txt").exists()
    (run / "notes.txt").unlink()
    (run / MARKER).unlink()                           # a run written before the marker existed
    result = _train(inputs, run, "--overwrite", **{"train.max_steps": 1})
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_directory_that_is_not_a_run_is_refused(inputs, tmp_path):
    (tmp_path / "config.yaml").write_text("mine: true\n")
    for args in ((), ("--overwrite",)):
        result = _train(inputs, tmp_path, *args)
        assert "not a kdpipe training run" in str(result.exception), result.output
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"


def test_overwrite_checks_config_and_data_before_deleting(inputs, tmp_path):
    run = tmp_path / "run"
    assert _train(inputs, run).exit_code == 0
    before = _files(run)
    bad = [{"data.path": str(tmp_path / "missing")}, {"eval.data": str(tmp_path / "missing")},
           {"data.codec": "default"}, {"loss.layer_map": "[[1, 7]]",
                                       "loss.terms": "[{kind: hidden_cosine, weight: 1.0}]"}]
    for sets in bad:
        result = _train(inputs, run, "--overwrite", **sets)
        assert result.exit_code != 0 and result.exception is not None, sets
        assert _files(run) == before, sets


def test_student_fit_is_checked_before_converting_the_teacher(inputs, tmp_path, teacher_dir):
    """The embedded teacher's vocabulary (49152) does not fit the toy dataset (64): refused
    from the configs alone, before a student is converted or the out directory is made."""
    cfg = load_config(None, tiny_config(tmp_path, inputs / "ds", inputs / "student") +
                      ["student.path=null", f"student.teacher={teacher_dir}"])
    with pytest.raises(ConfigError, match="vocab_size 64") as e:
        Trainer(cfg)
    assert "(built from the teacher)" in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot create files in (root ignores modes: /proc/sys)."""
    if os.geteuid() == 0:
        yield Path("/proc/sys")
        return
    tmp_path.chmod(0o555)
    yield tmp_path
    tmp_path.chmod(0o755)


def test_read_only_out_is_refused_first(inputs, read_only_dir):
    result = _train(inputs, read_only_dir / "run")
    assert isinstance(result.exception, ConfigError), result.output
    assert "read-only" in str(result.exception) and str(read_only_dir) in str(result.exception)


def test_student_init_overwrite_replaces_only_its_own_student(
        tiny_arcee_teacher, tmp_path):  # noqa: F811
    out = tmp_path / "student"
    convert_teacher(tiny_arcee_teacher, "3:1", out)
    convert_teacher(tiny_arcee_teacher, "kda", out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["layer_types"] == ["kda"] * 4
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        convert_teacher(tiny_arcee_teacher, "3:1", out, overwrite=True)
    assert (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="teacher"):
        check_student_out(tiny_arcee_teacher.parent, tiny_arcee_teacher, overwrite=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="not a kdpipe_hybrid student"):
        check_student_out(plain, tiny_arcee_teacher, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def _group_readable(root: Path) -> list[str]:
    return [str(p) for p in [root, *root.rglob("*")] if not p.stat().st_mode & stat.S_IRGRP]


def test_written_files_are_group_readable_and_load_with_transformers(
        inputs, tmp_path, tiny_arcee_teacher):  # noqa: F811
    run = tmp_path / "run"
    assert _train(inputs, run, **{"checkpoint.every": 1}).exit_code == 0
    assert _group_readable(run) == []
    convert_teacher(tiny_arcee_teacher, "3:1", tmp_path / "student")
    assert _group_readable(tmp_path / "student") == []
    code = ("import kdpipe.student_train, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(run / 'final')!r})\n"
            "print(type(m).__name__, m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2,"
            " do_sample=False).shape[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["KDAHybridForCausalLM", "5"]


def test_evaluation_shows_progress(inputs, tmp_path):
    args = [sys.executable, "-c", "from kdpipe.cli import main; main()", "eval", "--student",
            str(inputs / "student"), "--data", str(inputs / "held"), "--seq-len", "24",
            "--device", "cpu", "--no-tokenizer-check"]
    shown = subprocess.run(args + ["--progress"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert re.search(r"eval: +\d+%.*batch/s", shown.stderr), shown.stderr
    quiet = subprocess.run(args, capture_output=True, text=True)      # stderr is not a TTY
    assert quiet.returncode == 0 and "eval:" not in quiet.stderr
    result = _train(inputs, tmp_path / "run", **{"log.progress": True})  # in-training eval
    assert result.exit_code == 0 and re.search(r"eval: +\d+%.*batch/s", result.stderr)


def test_help_shows_examples():
    for argv in (["train", "--help"], ["student", "--help"], ["student", "init", "--help"],
                 ["eval", "--help"]):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 0 and "Example" in result.output, argv
        assert f"kdpipe {argv[0]} " in result.output.split("Example", 1)[1], argv


def _make_train(inputs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`make train` of this repository on the toy inputs (setup and heldout taken as made)."""
    sets = [s for s in tiny_config(inputs, inputs / "ds", inputs / "student")
            if not s.startswith(("out=", "data.path="))]
    args = " ".join(f"--set {s}" for s in sets + ["student.teacher=null", "train.frozen=[]"])
    venv = Path(sys.executable).parent.parent
    return subprocess.run(["make", "-s", "-C", str(REPO), "-o", "setup", "-o", "heldout", "train",
                           f"VENV={venv}", f"DATA={inputs / 'ds'}", f"OUT={out}",
                           f"HELDOUT={inputs / 'held'}", f"ARGS={args}", *extra],
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_make_train_overwrites_only_on_request_and_only_its_run(inputs, tmp_path):
    before = _files(inputs)
    refused = _make_train(inputs, inputs / "held", "OVERWRITE=1")   # OUT=the held-out set
    assert refused.returncode != 0 and "eval.data" in refused.stderr, refused.stderr[-2000:]
    assert _files(inputs) == before
    run = tmp_path / "run"
    assert _make_train(inputs, run).returncode == 0
    again = _make_train(inputs, run)                                 # as make demo did twice
    assert again.returncode != 0 and "--resume" in again.stderr
    assert _make_train(inputs, run, "OVERWRITE=1").returncode == 0
    assert (run / "final" / "model.safetensors").exists() and _files(inputs) == before
