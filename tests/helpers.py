"""Small builders shared by tests: real text from installed docstrings, JSONL writers, logits
that make an exact top-k hard."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


def tied_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Logits that make an exact top-k hard: massive ties, ties across group boundaries and
    near the k-th value, winners in the last group, all-negative rows with +0/-0 ties
    (``rows`` >= 215 holds every kind)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 3
    x[:80] = torch.randint(0, 3, (min(rows, 80), vocab), generator=g).float()  # massive ties
    x[80:120, 3:90] = 2.5                                          # ties across the boundary
    x[120:140, -70:] = 9.0                                         # winners in the last group
    x[140:200] = torch.randn(x[140:200].shape, generator=g) * 0.05  # flat: ties near the k-th
    x[200:215] = -torch.rand(x[200:215].shape, generator=g) - 1    # all negative
    x[200:215, 7::3] = 0.0                                         # +0 and -0 tie
    x[200:215, 8::3] = -0.0
    return x.to(dtype)


def assert_exact_topk(x: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor,
                      atol: float = 2e-6) -> None:
    """``ids``/``lp`` against an independent float64 reference: the lexicographic order
    (logit desc, id asc) by a stable sort, and ``log_softmax``."""
    k = ids.shape[1]
    x64 = x.double()
    assert torch.equal(ids, torch.sort(-x64, dim=-1, stable=True).indices[:, :k])
    torch.testing.assert_close(lp.double(), torch.log_softmax(x64, -1).gather(-1, ids),
                               atol=atol, rtol=0)
