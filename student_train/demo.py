"""The summary ``make demo`` prints: what was captured and what training did with it.

Teacher-forced numbers are read from artifacts, not recomputed: the capture's manifest
(tokens, shard bytes) and the run's ``metrics.jsonl`` (the held-out evaluation at step 0 is the
converted student before training; the last one is after). Free-running agreement is not in
the run's records, so it is measured here (``generation_agreement``): a few short greedy
continuations of the student before and after training against the teacher's.
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


def generation_agreement(run_dir: str, *, teacher: str | None = None, prompts: int = 4,
                         prompt_len: int = 16, new_tokens: int = 8) -> dict:
    """``gen_agreement_before`` / ``_after``: per-token free-running agreement with the teacher
    of the run's initial student (``student.path`` or the conversion in ``OUT/student-init``)
    and of its final one, on prompts from the run's held-out data."""
    from .generate_eval import generation_eval
    from .train_config import load_config

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    if not cfg.eval.data:
        raise ConfigError(f"{run_dir}: the run has no held-out data (eval.data) to take "
                          f"prompts from")
    before = cfg.student.path or str(run / "student-init")
    got = generation_eval([before, str(run / "final")], cfg.eval.data, teacher=teacher,
                          prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens,
                          device=cfg.train.device)
    return {"gen_agreement_before": got[0].gen_agreement,
            "gen_agreement_after": got[1].gen_agreement,
            "gen_prompts": got[0].prompts, "gen_new_tokens": new_tokens}


def write_summary(summary: dict, out_json: str | Path) -> None:
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
