"""What the benchmarks on the embedded teacher share: its captures and the converted students
their training runs start from, each made once in a work directory and reused by later runs."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.capture.teacher import prepare_embedded_teacher


def capture(data: Path, out: Path, *, codec: str, limit: int | None, max_seq_len: int,
            **options) -> Path:
    """``data`` captured by the embedded teacher on the CPU into ``out`` (kept if complete);
    ``options``: more ``CaptureOptions`` fields (hidden layers, their source...)."""
    if not (out / "manifest.json").exists():
        t0 = time.time()
        s = run_capture(CaptureOptions(model="embedded", data=str(data), out=str(out),
                                       codec=codec, limit=limit, max_seq_len=max_seq_len,
                                       device="cpu", progress=False, **options))
        print(f"captured {out.name}: {s.documents} documents, {s.tokens} tokens, "
              f"{time.time() - t0:.0f} s", flush=True)
    return out


def student(workdir: Path, seed: int) -> Path:
    """The demo's 3:1 student converted from the teacher once per seed: every run of that
    seed starts from it."""
    from kdpipe.student_train.model.convert import convert_teacher
    out = workdir / f"student-seed{seed}"
    if not (out / "config.json").exists():
        convert_teacher(prepare_embedded_teacher(), "3:1", out, seed=seed, overwrite=True)
    return out


def write_report(path: Path, report: dict, args, t_start: float) -> None:
    """``report`` as JSON at ``path``, with the run's arguments, duration and machine."""
    report = {**report, "args": {k: str(v) for k, v in vars(args).items()},
              "seconds": time.time() - t_start, "machine": platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
