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
