"""The wheel installs one import root, ``kdpipe``, and works from outside the repository.

The wheel is built from this checkout and installed without dependencies into a new
virtual environment in a temporary directory; that environment borrows the test
environment's site-packages (torch, transformers, ...) through path entries, which do not
run their ``.pth`` files, so the editable install of this checkout stays out of sight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, cwd=out)
    (whl,) = out.glob("kdpipe-*.whl")
    return whl


@pytest.fixture(scope="module")
def env(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; dependencies come from the test environment."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    purelib = subprocess.run([root / "bin" / "python", "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in map(Path, sys.path) if p.is_dir() and "site-packages" in p.parts]
    Path(purelib, "test-deps.pth").write_text("".join(f"{p}\n" for p in deps))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"),
                    "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    return root


def _run(env: Path, *args: str, cwd: Path) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(args, cwd=cwd, env=clean, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_kdpipe_is_the_only_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kdpipe"}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for module in ("kdpipe/capture/run.py", "kdpipe/compress/presets/default.yaml",
                   "kdpipe/schemas/manifest.py", "kdpipe/student_train/model/modeling.py",
                   "kdpipe/student_train/configs/demo.yaml"):
        assert module in names


def test_installed_wheel_runs_outside_the_repository(env, tmp_path):
    py = str(env / "bin" / "python")
    where = _run(env, py, "-c", "import kdpipe, kdpipe.capture.run, kdpipe.student_train; "
                 "print(kdpipe.__file__)", cwd=tmp_path)
    assert where.startswith(str(env)), where
    for name in ("capture", "compress", "schemas", "student_train"):
        _run(env, py, "-c", f"import importlib.util, sys; "
             f"sys.exit(importlib.util.find_spec({name!r}) is not None)", cwd=tmp_path)
    assert "capture" in _run(env, str(env / "bin" / "kdpipe"), "--help", cwd=tmp_path)


def test_student_loads_through_auto_model_from_the_wheel(env, tmp_path):
    py = str(env / "bin" / "python")
    _run(env, py, "-c", f"""
from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM
cfg = KDAHybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, layer_types=["kda", "full_nope"], kda_backend="torch")
KDAHybridForCausalLM(cfg).save_pretrained({str(tmp_path / "student")!r})
""", cwd=tmp_path)
    out = _run(env, py, "-c", f"""
import torch, kdpipe.student_train
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "student")!r})
print(type(m).__module__, m(torch.tensor([[1, 2, 3]])).logits.shape)
""", cwd=tmp_path)
    assert out.split() == ["kdpipe.student_train.model.modeling", "torch.Size([1,", "3,", "64])"]


def test_import_contracts_hold(env, tmp_path):
    """pyproject's import-linter contracts (the stage rules) over the installed package: the
    editable install maps the stage folders in with a finder that import-linter cannot walk."""
    done = subprocess.run(
        [str(env / "bin" / "python"), "-c",
         "from importlinter.cli import lint_imports_command; lint_imports_command()",
         str(REPO / "pyproject.toml")],
        cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
