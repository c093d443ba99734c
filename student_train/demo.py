"""The summary ``make demo`` prints: what was captured and what training did with it.

Read from artifacts only, nothing recomputed: the capture's manifest (tokens, shard bytes)
and the run's ``metrics.jsonl`` (the held-out evaluation at step 0 is the converted student
before training; the last one is after).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdpipe.compress import Dataset
from kdpipe.schemas import ConfigError

from .metrics import read_metrics


def summarize(capture_dir: str, run_dir: str) -> dict:
    m = Dataset(capture_dir).manifest
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    train = [r for r in records if r.get("kind") == "train"]
    if not evals or evals[0]["step"] != 0 or len(evals) < 2:
        raise ConfigError(f"{run_dir}: needs held-out evaluations at step 0 and after training "
                          f"(eval.data set, eval.at_start and eval.at_end true); found "
                          f"{[r['step'] for r in evals]}")
    before, after = evals[0], evals[-1]
    return {
        "tokens_captured": m.tokens,
        "bytes_per_token": m.total_bytes / max(m.tokens, 1),
        "kl_before": before["kl"],
        "kl_after": after["kl"],
        "top1_before": before["top1"],
        "top1_after": after["top1"],
        "codec": m.codec.name,
        "documents_captured": m.documents,
        "steps": after["step"],
        "tokens_trained": train[-1].get("tokens_seen", 0) if train else 0,
        "heldout_tokens": after.get("tokens", 0),
    }


def write_summary(summary: dict, out_json: str | Path) -> None:
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
