"""Small builders shared by tests: real text from installed docstrings, JSONL writers."""

from __future__ import annotations

import json
from pathlib import Path

TEXT_SOURCES = ["json", "collections", "functools", "itertools", "pathlib", "textwrap",
                "argparse", "decimal", "fractions", "heapq", "bisect", "shlex", "csv",
                "logging", "random", "string", "struct", "typing", "abc", "dataclasses"]


def docstring_texts(n: int, max_chars: int = 600) -> list[str]:
    import importlib
    texts = []
    for name in TEXT_SOURCES:
        doc = importlib.import_module(name).__doc__ or ""
        if doc.strip():
            texts.append(doc.strip()[:max_chars])
        if len(texts) == n:
            break
    return texts


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def capture_small(out: Path, teacher_dir: Path, n_docs: int = 4, **options) -> Path:
    """A real capture of the embedded teacher: ``n_docs`` short documents, exact codec, the
    embedding layer's hidden states; a few seconds on a CPU."""
    from kdpipe.capture.run import CaptureOptions, run_capture

    out.parent.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(out.parent / f"{out.name}.jsonl",
                       [{"text": t} for t in docstring_texts(n_docs, 200)])
    settings = dict(top_k=4, max_seq_len=32, hidden_layers="0", progress=False) | options
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out), **settings))
    return out


def run_main(args: list, capsys, monkeypatch) -> tuple[int, str, str]:
    """``kdpipe ARGS`` in this process, as the console script runs it: (exit code, out, err)."""
    import sys

    from kdpipe.cli import main
    monkeypatch.setattr(sys, "argv", ["kdpipe", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
