"""Stored against recomputed tail: how far each is from the exact missing mass, and what it
does to a student trained with ``missing: tail``.

The embedded teacher (SmolLM2-135M-Instruct) captures the same records of the embedded
corpus (`kdpipe corpus build`) twice, as `exact` and as `default` (whose grid values store
every row's missing mass), plus an `exact` held-out set. `kdpipe compress` re-encodes the
`default` capture as `default` without the stored mass (`values.tail_mass: false`): the same
grid indices, so the decoded top-k are bit-identical (checked), and training recomputes the
tail from them. Then:

(a) per teacher row, |tail - exact tail| in probability for the stored tail and for the
    recomputed one (exact tail: ``1 - sum exp`` of the `exact` capture's float32 top-k, in
    float64), mean, p99 and max;
(b) the demo recipe (student_train/configs/demo.yaml: KL at T = 1 with ``missing: tail``
    plus CE) from the stored-tail shards and from the recomputed-tail shards, same seeds,
    held-out KL (teacher || student, top-k + tail bucket) at the end; --repeats seeds.

    python bench/bench_tail.py --out bench/results/tail_cpu.json

prints a table and writes the JSON (every repeat). Defaults: 48 records of 128 tokens (the
demo's capture), the first 16 of the demo's 48 steps, 2 seeds, to fit a shared 2-core CPU;
--steps 48 runs the whole recipe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdpipe.compress import Dataset, load_codec_config  # noqa: E402
from kdpipe.student_train.packing import missing_mass  # noqa: E402
from kdpipe.student_train.train_config import load_config  # noqa: E402

from embedded import capture, student, write_report  # noqa: E402

KDPIPE = str(Path(sys.executable).with_name("kdpipe"))



def without_stored_tail(src: Path, out: Path) -> Path:
    """``src`` re-encoded by its codec with ``values.tail_mass: false``."""
    if not (out / "manifest.json").exists():
        config = Dataset(str(src)).manifest.codec.to_dict()
        config["name"] = f"{config['name']}-no-tail"
        config["values"] = dict(config["values"], tail_mass=False)
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(config))
        subprocess.run([KDPIPE, "compress", str(src), str(out), "--codec", str(path)],
                       check=True)
    return out


def tail_errors(exact: Path, stored: Path, recomputed: Path) -> dict:
    """|stored - exact| and |recomputed - exact| over every teacher row, in probability."""
    ref, got_s, got_r = [], [], []
    docs = zip(*(Dataset(str(p)).iter_documents(hidden_layers=[])
                 for p in (exact, stored, recomputed)))
    for e, s, r in docs:
        if not (e.doc_id == s.doc_id == r.doc_id and torch.equal(s.topk_ids, r.topk_ids)
                and torch.equal(s.topk_logprobs, r.topk_logprobs)):
            sys.exit(f"{e.doc_id}: the captures do not hold the same rows")
        assert e.tail_mass is None and s.tail_mass is not None and r.tail_mass is None
        ref.append((1.0 - e.topk_logprobs.double().exp().sum(-1)).clamp(min=0.0))
        got_s.append(s.tail_mass.double())
        got_r.append(missing_mass(r.topk_logprobs).double())
    ref, got_s, got_r = (torch.cat(x).numpy() for x in (ref, got_s, got_r))
    out = {"rows": int(ref.size), "exact_tail_mean": float(ref.mean())}
    for name, got in (("stored", got_s), ("recomputed", got_r)):
        err = np.abs(got - ref)
        out[name] = {"abs_err_mean": float(err.mean()),
                     "abs_err_p99": float(np.percentile(err, 99)),
                     "abs_err_max": float(err.max()),
                     "rows_at_zero": int((got == 0).sum())}
    return out



def train(name: str, data: Path, heldout: Path, args, seed: int) -> dict:
    from kdpipe.student_train.trainer import Trainer
    out = args.workdir / f"train-{name}-seed{seed}"
    cfg = load_config(ROOT / "student_train" / "configs" / "demo.yaml", [
        f"out={out}", f"data.path={data}", f"eval.data={heldout}",
        f"student.path={student(args.workdir, seed)}", "student.teacher=null",
        f"train.max_steps={args.steps}", f"data.seed={seed}", f"train.seed={seed}",
        "train.device=cpu", "log.progress=false"])
    t0 = time.time()
    Trainer(cfg, overwrite=True).train()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    return {"tail": name, "seed": seed, "kl_before": evals[0]["kl"],
            "kl_after": evals[-1]["kl"], "kl_topk_after": evals[-1]["kl_topk"],
            "top1_after": evals[-1]["top1"], "train_seconds": time.time() - t0,
            "eval_curve": [(r["step"], r["kl"]) for r in evals]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_tail")
    p.add_argument("--limit", type=int, default=48, help="corpus records to capture")
    p.add_argument("--heldout-limit", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="training seeds 0..repeats-1")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    corpus = args.workdir / "corpus" / "train.jsonl"
    if not corpus.exists():
        subprocess.run([KDPIPE, "corpus", "build", "--out", str(corpus)], check=True)
    common = dict(limit=args.limit, max_seq_len=args.max_seq_len)
    exact = capture(corpus, args.workdir / "exact", codec="exact", **common)
    stored = capture(corpus, args.workdir / "default", codec="default", **common)
    heldout = capture(corpus.with_name("heldout.jsonl"), args.workdir / "heldout",
                      codec="exact", limit=args.heldout_limit, max_seq_len=args.max_seq_len)
    recomputed = without_stored_tail(stored, args.workdir / "default-no-tail")
    errors = tail_errors(exact, stored, recomputed)

    runs = []
    for seed in range(args.repeats):
        for name, data in (("stored", stored), ("recomputed", recomputed)):
            runs.append(train(name, data, heldout, args, seed))
            print(f"seed {seed} {name:<10} held-out KL {runs[-1]['kl_before']:.4f} -> "
                  f"{runs[-1]['kl_after']:.4f} ({runs[-1]['train_seconds']:.0f} s)")

    print(f"\n(a) tail error against the exact capture, {errors['rows']} rows "
          f"(mean exact tail {errors['exact_tail_mean']:.4f})")
    print(f"{'tail':<12}{'mean |err|':>12}{'p99 |err|':>12}{'max |err|':>12}{'rows at 0':>11}")
    for name in ("stored", "recomputed"):
        e = errors[name]
        print(f"{name:<12}{e['abs_err_mean']:>12.2e}{e['abs_err_p99']:>12.2e}"
              f"{e['abs_err_max']:>12.2e}{e['rows_at_zero']:>11}")
    print(f"\n(b) held-out KL after {args.steps} steps of the demo recipe")
    print(f"{'seed':<6}{'tail':<12}{'KL before':>11}{'KL after':>11}{'top-1':>8}")
    for r in runs:
        print(f"{r['seed']:<6}{r['tail']:<12}{r['kl_before']:>11.4f}{r['kl_after']:>11.4f}"
              f"{r['top1_after']:>8.3f}")
    mean = {name: float(np.mean([r["kl_after"] for r in runs if r["tail"] == name]))
            for name in ("stored", "recomputed")}
    print(f"mean KL after: stored {mean['stored']:.4f}, recomputed {mean['recomputed']:.4f} "
          f"({(mean['stored'] - mean['recomputed']) / mean['recomputed']:+.2%})")

    m = Dataset(str(stored)).manifest
    report = {"tail_error": errors, "training": runs, "kl_after_mean": mean,
              "documents": m.documents, "tokens": m.tokens,
              "codec": load_codec_config("default").to_dict()}
    write_report(args.out, report, args, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
