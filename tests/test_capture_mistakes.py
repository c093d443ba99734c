"""Capture under user mistakes and interruptions: stops keep finished windows, bad paths and
options fail before the teacher loads, reruns recognize the same input, one process per part."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kdpipe.capture.inputs import iter_records
from kdpipe.capture.lock import PartLock
from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset
from kdpipe.compress.verify import verify_dataset
from kdpipe.schemas import ConfigError
from tests.helpers import docstring_texts, write_jsonl

TEXTS = docstring_texts(24, 300)
SMALL = dict(top_k=8, max_seq_len=48, window=2, progress=False)


def _cli(teacher, data, out, *extra) -> list[str]:
    return [sys.executable, "-c", "from kdpipe.cli import main; main()", "capture",
            "--model", str(teacher), "--data", str(data), "--out", str(out), "--top-k", "8",
            "--max-seq-len", "48", "--window", "2", *extra]


def _run_until_first_commit(args, frag, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)
    deadline = time.time() + 300
    while proc.poll() is None and not frag.exists() and time.time() < deadline:
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigint_keeps_finished_windows_says_so_and_resumes(tmp_path, teacher_dir, writer):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "ds"     # default --shard-mb: no shard would fill before the stop
    frag = out / "parts" / "part-00000-of-00001.json"
    proc = _run_until_first_commit(_cli(teacher_dir, data, out, "--writer", writer), frag)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "finishing the current window" in stderr
    assert f"records to read: {len(TEXTS)}" in stderr and f"/{len(TEXTS)}" in stderr  # bar
    stored = int(stdout.split("SIGINT; ")[1].split(" documents")[0])
    assert 0 < stored < len(TEXTS) and "rerun the same command to resume" in stdout
    assert sum(s["documents"] for s in json.loads(frag.read_text())["shards"]) == stored
    again = subprocess.run(_cli(teacher_dir, data, out, "--no-progress"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "complete" in again.stdout, again.stderr
    assert verify_dataset(str(out), deep=True).ok
    assert len(list(Dataset(str(out)).iter_documents())) == len(TEXTS)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_second_signal_aborts_at_once_leaving_only_whole_shards(tmp_path, teacher_dir, writer):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "ds"
    frag = out / "parts" / "part-00000-of-00001.json"
    proc = _run_until_first_commit(_cli(teacher_dir, data, out, "--no-progress", "--writer",
                                        writer), frag)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]
    shards = json.loads(frag.read_text())["shards"]
    assert shards and {f"shards/{p.name}" for p in (out / "shards").iterdir()} == \
        {s["file"] for s in shards}
    for s in shards:      # every listed shard whole
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]


def test_cleanup_removes_only_its_own_leftovers(tmp_path, teacher_dir, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:3]],
                       raw_lines=[b"{not json"])
    out = tmp_path / "ds"
    (out / "shards").mkdir(parents=True)
    (out / "parts").mkdir()
    mine = ["shards/.tmp-0123abcd-p00000-of-00001-000000.parquet",
            "shards/p00000-of-00001-000099.parquet", "parts/.tmp-0123abcd-part-00000-of-00001.json"]
    users = ["shards/p00000-of-00001-notes.txt", "shards/p00000-of-00001-000000.parquet.bak",
             "shards/.tmp-0123abcd-p00001-of-00002-000000.parquet", "parts/notes.json",
             "keep.txt"]
    for rel in mine + users:
        (out / rel).write_bytes(b"x")
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), **SMALL))
    assert all((out / rel).exists() for rel in users)
    assert not any((out / rel).exists() for rel in mine)
    assert f"{data}:4: malformed json" in capsys.readouterr().err   # file and line named


def test_rerun_spelled_differently_resumes_and_a_changed_input_is_refused(
        tmp_path, teacher_dir, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:3]])
    out = tmp_path / "ds"
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), **SMALL))
    before = (out / "manifest.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    s = run_capture(CaptureOptions(model="embedded", data="./in.jsonl", out="ds", **SMALL))
    assert s.complete and (out / "manifest.json").read_bytes() == before
    os.utime(data, (0, 0))                         # a copy or touch does not matter
    run_capture(CaptureOptions(model="embedded", data="in.jsonl", out="ds", **SMALL))
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more record"}) + "\n")
    with pytest.raises(ConfigError, match="input's content changed"):
        run_capture(CaptureOptions(model="embedded", data="in.jsonl", out="ds", **SMALL))


def test_second_process_on_the_same_part_is_refused_and_a_dead_holder_is_not(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kdpipe.capture.lock import PartLock\n"
         f"with PartLock({str(out)!r}, 0, 1, print):\n print('held', flush=True)\n"
         " time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(ConfigError, match=f"already being captured by pid {holder.pid}"):
        run_capture(CaptureOptions(model="embedded", data=str(data), out=str(out), **SMALL))
    holder.kill()                                  # crashes without removing its lock file
    holder.wait()
    assert (out / ".kdpipe-part-00000-of-00001.lock").exists()
    with PartLock(str(out), 0, 1, print):
        pass
    assert not (out / ".kdpipe-part-00000-of-00001.lock").exists()


def _expect(match: str, **kw) -> None:
    t0 = time.time()
    with pytest.raises(ConfigError, match=match):
        run_capture(CaptureOptions(**{**dict(model="embedded", **SMALL), **kw}))
    assert time.time() - t0 < 20          # refused before any teacher loads


def test_cheap_mistakes_fail_before_the_teacher_loads(tmp_path, teacher_dir, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    out = str(tmp_path / "ds")
    _expect("--data .*missing.jsonl: no such file", data=str(tmp_path / "missing.jsonl"),
            out=out)
    _expect("--model /no/such/teacher: no such local directory", model="/no/such/teacher",
            data=str(data), out=out)
    (tmp_path / "notamodel").mkdir()
    _expect("no config.json", model=str(tmp_path / "notamodel"), data=str(data), out=out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _expect("no such local path, and HF_HUB_OFFLINE is set", model="models/teacher",
            data=str(data), out=out)
    (tmp_path / "file").write_text("x")
    _expect("exists and is not a directory", data=str(data), out=str(tmp_path / "file"))
    _expect("--top-k 999999 exceeds", data=str(data), out=out, top_k=999999)
    assert not (tmp_path / "ds").exists()


def test_read_only_out_says_so(tmp_path, teacher_dir):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
        _expect("--out .*ro: cannot write there .Read-only file system", data=str(data),
                out=str(mnt))
        _expect("cannot create it .Read-only file system", data=str(data), out=str(mnt / "ds"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_mistyped_path_on_the_command_line_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from kdpipe.cli import main; main()", "capture",
                        "--model", "embedded", "--data", str(tmp_path / "nope.jsonl"),
                        "--out", str(tmp_path / "ds")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --data ") and "no such file" in r.stderr


def test_capture_that_writes_nothing_fails_and_says_why(tmp_path, teacher_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _expect("no input records", data=str(empty), out=str(tmp_path / "a"))
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(ConfigError, match=r"all 2 records were skipped \(empty text: 2\)"):
        run_capture(CaptureOptions(model="embedded", data=str(blank), out=str(tmp_path / "b"),
                                   **SMALL))
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_byte_order_mark_does_not_drop_the_first_record(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "b.json").write_bytes(bom + b'[{"text": "third"}]')
    (tmp_path / "c.csv").write_bytes(bom + b"text\nfourth\n")
    assert [r["text"] for r in iter_records(str(tmp_path))] == \
        ["first", "second", "third", "fourth"]
