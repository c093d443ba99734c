"""The embedded corpus: real English technical text built from the local Python install.

Documents are the docstrings of the standard library's modules, classes and
functions, read with ``ast`` (nothing is imported or executed). A tenth of the
modules also yield chat records (a question about the object and its docstring as
the assistant's reply) so chat rendering and assistant-only loss masks are exercised.
The split is by module (a stable hash), so held-out text is unseen in training.
The result depends only on the Python version installed, not on the network.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
             "turtledemo", "__pycache__", "ensurepip", "tkinter"}
MIN_CHARS = 200
MAX_CHARS = 6000


def _module_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("_") and part != "__init__.py"
               for part in rel.parts):
            continue
        files.append(p)
    return files


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                yield f"{module}.{node.name}", doc


def _chunks(pieces: list[str]) -> Iterator[str]:
    buf = ""
    for piece in pieces:
        piece = piece[:MAX_CHARS]
        if buf and len(buf) + len(piece) > MAX_CHARS:
            yield buf
            buf = ""
        buf = f"{buf}\n\n{piece}" if buf else piece
    if buf:
        yield buf


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


def build_corpus(out: Path, heldout: Path, *, heldout_percent: int = 5,
                 stdlib: Path | None = None) -> dict[str, int]:
    """Write train and held-out JSONL files; returns record counts."""
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    counts = {"train": 0, "heldout": 0, "chat": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    heldout.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as ftrain, open(heldout, "w") as fheld:
        for path in _module_files(root):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(
                ".__init__")
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            docs = list(_docstrings(tree, module))
            if not docs:
                continue
            bucket = _bucket(module)
            f, split = (fheld, "heldout") if bucket < heldout_percent else (ftrain, "train")
            for j, text in enumerate(_chunks([f"{name}\n\n{doc}" for name, doc in docs])):
                if len(text) < MIN_CHARS:
                    continue
                f.write(json.dumps({"id": f"{module}:{j}", "text": text}) + "\n")
                counts[split] += 1
            if bucket % 10 == 3:  # about a tenth of modules also give chat records
                for name, doc in docs[:3]:
                    msgs = [{"role": "user", "content": f"What does `{name}` do in Python?"},
                            {"role": "assistant", "content": doc[:MAX_CHARS // 2]}]
                    f.write(json.dumps({"id": f"{name}:chat", "messages": msgs}) + "\n")
                    counts[split] += 1
                    counts["chat"] += 1
    return counts
