"""Run metrics: one JSON line per record in ``OUT/metrics.jsonl``, mirrored to TensorBoard,
and ``plot_run`` which draws the curves of a run directory to a PNG.

Records are ``{"kind": "train" | "eval", "step": N, ...values}``; a train record's
``stage_s`` holds the seconds of the step's stages (``Trainer.one_step`` says which). On
resume the file is cut back to the checkpoint's step, so a resumed run's file reads as if it
had never stopped (timings aside).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:          # a line cut short by a kill
            continue
    return out


class MetricsLog:
    """Writes metrics on the main rank only; other ranks get a no-op log."""

    def __init__(self, out: str | Path, *, enabled: bool, tensorboard: bool,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            # replaced, not rewritten in place: a kill mid-write must not lose kept records
            kept = [r for r in read_metrics(out) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".tmp-{METRICS_FILE}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in _scalars(values):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalars(values: dict, prefix: str = ""):
    """(name, value) of the finite numbers in ``values``, nested dicts as ``key/sub``."""
    for k, v in values.items():
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and math.isfinite(v):
            yield f"{prefix}{k}", v


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw training losses and held-out metrics of a run against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        from kdpipe.schemas import ConfigError
        raise ConfigError(f"{Path(run_dir) / METRICS_FILE}: no metrics to plot")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    panels = [("training loss", train, [k for k in (train[0] if train else {})
                                         if k.startswith("loss")]),
              ("held-out KL to the teacher (nats/token)", evals, ["kl", "kl_topk"]),
              ("held-out top-1 agreement", evals, ["top1"]),
              ("held-out next-token cross-entropy", evals, ["ce"])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, rows, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png) if out_png else Path(run_dir) / "curves.png"
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
