"""User mistakes reach the user as one line naming the path, never as a traceback.

Each case runs the real ``kdpipe`` entry point (``kdpipe.cli.main``) on a real capture of
the embedded teacher or on a path that is wrong in the way a user gets it wrong.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from kdpipe.cli import main
from tests.helpers import capture_small


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir):
    return capture_small(tmp_path_factory.mktemp("errors") / "ds", teacher_dir)


def run_kdpipe(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Exit status and stderr of ``kdpipe ARGS`` run in this process."""
    monkeypatch.setattr(sys, "argv", ["kdpipe", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return exit_info.value.code, captured.err


def assert_one_line_naming(err: str, path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(path) in lines[0], err


READERS = {
    "inspect": lambda ds, out: ["inspect", ds],
    "verify": lambda ds, out: ["verify", ds],
    "dump": lambda ds, out: ["dump", ds, "--out", out / "x.npz"],
    "show": lambda ds, out: ["show", ds],
    "fidelity": lambda ds, out: ["fidelity", ds, "--codecs", "exact"],
    "compress": lambda ds, out: ["compress", ds, out / "small", "--codec", "small"],
    "export": lambda ds, out: ["export", "--format", "axolotl", ds, out / "ax"],
    "import": lambda ds, out: ["import", "--format", "distillkit", ds, out / "imported"],
}


@pytest.mark.parametrize("command", sorted(READERS))
def test_mistyped_dataset_path(command, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "captrue"   # a typo: nothing there
    code, err = run_kdpipe(READERS[command](missing, tmp_path), capsys, monkeypatch)
    assert code == 2
    assert_one_line_naming(err, missing)
    assert "no such" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # and nothing was written


@pytest.mark.parametrize("command", ["inspect", "verify", "dump", "show", "compress", "export"])
def test_directory_that_is_not_a_dataset(command, tmp_path, capsys, monkeypatch):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("not a dataset")
    code, err = run_kdpipe(READERS[command](other, tmp_path), capsys, monkeypatch)
    assert code == 2
    assert_one_line_naming(err, other)
    assert "not a kdpipe dataset" in err


def test_shard_file_given_as_dataset(dataset, capsys, monkeypatch):
    shard = next((dataset / "shards").glob("*.parquet"))
    code, err = run_kdpipe(["inspect", shard], capsys, monkeypatch)
    assert code == 2 and "is a file" in err
    assert_one_line_naming(err, shard)


def test_importer_given_foreign_parquet(dataset, tmp_path, capsys, monkeypatch):
    shard = next((dataset / "shards").glob("*.parquet"))
    # the file itself
    code, err = run_kdpipe(["import", "--format", "distillkit", shard, tmp_path / "a"],
                           capsys, monkeypatch)
    assert code == 2 and "is a file" in err
    assert_one_line_naming(err, shard)
    # a kdpipe dataset
    code, err = run_kdpipe(["import", "--format", "distillkit", dataset, tmp_path / "b"],
                           capsys, monkeypatch)
    assert code == 2 and "kdpipe dataset" in err
    assert_one_line_naming(err, dataset)
    # a DistillKit-looking directory whose Parquet files are not DistillKit's
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "compression_config.yaml").write_text("d: 49152\nk: 4\nexact_k: 4\n")
    shutil.copy(shard, foreign / "data_0.parquet")
    code, err = run_kdpipe(["import", "--format", "distillkit", foreign, tmp_path / "c"],
                           capsys, monkeypatch)
    assert code == 2 and "missing columns" in err
    assert_one_line_naming(err, foreign / "data_0.parquet")
    # a file that only has the name of a Parquet file
    (foreign / "data_0.parquet").write_bytes(b"id,text\n1,hello\n")
    code, err = run_kdpipe(["import", "--format", "distillkit", foreign, tmp_path / "d"],
                           capsys, monkeypatch)
    assert code == 2 and "not a readable Parquet file" in err
    assert_one_line_naming(err, foreign / "data_0.parquet")
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("args", [
    lambda ds, missing: ["dump", ds, "--out", missing / "x.npz"],
    lambda ds, missing: ["fidelity", ds, "--codecs", "exact", "--json", missing / "rows.json"],
    lambda ds, missing: ["fidelity", ds, "--codecs", "exact", "--plot", missing / "kl.png"],
], ids=["dump --out", "fidelity --json", "fidelity --plot"])
def test_output_file_in_missing_directory(args, dataset, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing" / "dir"
    code, err = run_kdpipe(args(dataset, missing), capsys, monkeypatch)
    assert code == 2 and "does not exist" in err
    assert_one_line_naming(err, missing)


def test_console_script_prints_one_line(tmp_path):
    """The same through a separate interpreter, as a shell runs it."""
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, "-m", "kdpipe.cli", "verify", str(missing)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert_one_line_naming(result.stderr, missing)
