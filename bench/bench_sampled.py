"""The sampled teacher signal on the embedded teacher: bytes per token against the quality of
the estimate for several numbers of draws, and a student trained from it against one trained
from the `default` top-k.

The embedded teacher (SmolLM2-135M-Instruct) captures the same records of the embedded corpus
(`kdpipe corpus build`) as `exact` (the reference), once as `sampled` per number of draws
(--draws; the `sampled` preset's seed and temperature), and an `exact` held-out set;
`default` is the `exact` capture re-encoded by `kdpipe compress` (the same rows a `default`
capture stores). Then:

(a) per codec, ids and values bytes per token as stored; for the sampled captures, scored
    against the exact one (``compress.fidelity.evaluate_sampled``): distinct ids per row, the
    error of the sampled cross-entropy estimate of the teacher's entropy (0 when unbiased)
    with its standard error, the mean total variation of ``count / draws`` from the teacher,
    top-1 agreement; for `default`/`small`, their KL against the full distribution;
(b) the demo recipe (student_train/configs/demo.yaml, 3:1 student, KL at T = 1 with
    ``missing: tail`` plus CE) from `default`, and the same recipe with the KL term replaced
    by ``kind: sampled`` from the `sampled` preset's capture, same steps and seeds; held-out
    KL (teacher || student, top-k + tail bucket, `kdpipe eval`'s metric) at the end; with
    ``--heldout-codec dense-exact`` the held-out set is captured dense and the runs are also
    scored against the teacher's whole distribution (``kl_full``).

    python bench/bench_sampled.py --out bench/results/sampled_cpu.json

prints both tables and writes the JSON (every run). Defaults fit a shared 2-core CPU: the
demo's capture (48 records of 128 tokens), its 48 steps, 2 seeds. Captures, the converted
students and finished training runs in --workdir are reused by a rerun.
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
from kdpipe.compress.fidelity import evaluate, evaluate_sampled, load_sample  # noqa: E402
from kdpipe.student_train.train_config import load_config  # noqa: E402

from embedded import capture, student, write_report  # noqa: E402

KDPIPE = str(Path(sys.executable).with_name("kdpipe"))



def sampled_codec(workdir: Path, draws: int) -> str:
    """The `sampled` preset with ``draws`` draws, as a codec file (the preset itself when it
    has them)."""
    preset = load_codec_config("sampled")
    if preset.ids.params["draws"] == draws:
        return "sampled"
    config = preset.to_dict()
    config["name"] = f"sampled-{draws}"
    config["ids"] = dict(config["ids"], draws=draws)
    path = workdir / f"sampled-{draws}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def recode(src: Path, out: Path, codec: str) -> Path:
    if not (out / "manifest.json").exists():
        subprocess.run([KDPIPE, "compress", str(src), str(out), "--codec", codec], check=True)
    return out



def finished(out: Path, steps: int) -> list[dict] | None:
    """The metrics of a run in ``out`` that trained and evaluated all ``steps``, else None."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(x) for x in path.read_text().splitlines()]
    done = any(r["kind"] == "eval" and r["step"] == steps for r in records)
    return records if done else None


def train(name: str, data: Path, heldout: Path, args, seed: int, terms: str | None) -> dict:
    """One run of the recipe; a run of the same name that finished in the workdir (an
    interrupted benchmark's) is read back instead of trained again (``train_seconds`` None)."""
    from kdpipe.student_train.trainer import Trainer
    scored = "" if args.heldout_codec == "exact" else f"-{args.heldout_codec}"
    out = args.workdir / f"train-{name}-seed{seed}{scored}"
    records = finished(out, args.steps)
    if records is not None:
        return summary(name, seed, records, None)
    sets = [f"out={out}", f"data.path={data}", f"eval.data={heldout}",
            f"student.path={student(args.workdir, seed)}", "student.teacher=null",
            f"train.max_steps={args.steps}", f"data.seed={seed}", f"train.seed={seed}",
            "train.device=cpu", "log.progress=false"]
    if terms is not None:
        sets.append(f"loss.terms={terms}")
    cfg = load_config(ROOT / "student_train" / "configs" / "demo.yaml", sets)
    t0 = time.time()
    Trainer(cfg, overwrite=True).train()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary(name, seed, records, time.time() - t0)


def summary(name: str, seed: int, records: list[dict], seconds: float | None) -> dict:
    evals = [r for r in records if r["kind"] == "eval"]
    return {"data": name, "seed": seed, "kl_before": evals[0]["kl"],
            "kl_after": evals[-1]["kl"], "kl_topk_after": evals[-1]["kl_topk"],
            "top1_after": evals[-1]["top1"], "ce_after": evals[-1]["ce"],
            "kl_full_after": evals[-1].get("kl_full"),
            "top1_full_after": evals[-1].get("top1_full"),
            "train_seconds": seconds, "eval_curve": [(r["step"], r["kl"]) for r in evals]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_sampled")
    p.add_argument("--limit", type=int, default=48, help="corpus records to capture")
    p.add_argument("--heldout-limit", type=int, default=8)
    p.add_argument("--heldout-codec", default="exact",
                   help="dense-exact also scores the students against the teacher's whole "
                        "distribution (kl_full)")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--draws", default="8,16,32,64", help="numbers of draws to capture")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2, help="training seeds 0..repeats-1")
    p.add_argument("--no-train", action="store_true", help="(a) only")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(0)

    corpus = args.workdir / "corpus" / "train.jsonl"
    if not corpus.exists():
        subprocess.run([KDPIPE, "corpus", "build", "--out", str(corpus)], check=True)
    common = dict(limit=args.limit, max_seq_len=args.max_seq_len)
    exact = capture(corpus, args.workdir / "exact", codec="exact", **common)
    heldout = capture(corpus.with_name("heldout.jsonl"), args.workdir / (
        "heldout" if args.heldout_codec == "exact" else f"heldout-{args.heldout_codec}"),
        codec=args.heldout_codec, limit=args.heldout_limit, max_seq_len=args.max_seq_len)
    default = recode(exact, args.workdir / "default", "default")
    draws = [int(x) for x in args.draws.split(",")]
    preset_draws = load_codec_config("sampled").ids.params["draws"]
    sampled = {n: capture(corpus, args.workdir / f"sampled-{n}",
                          codec=sampled_codec(args.workdir, n), **common)
               for n in sorted(set(draws) | {preset_draws})}

    ref = Dataset(str(exact))
    sample = load_sample(ref, hidden_layers=[])
    sizes = []
    for name in ("default", "small"):
        r = evaluate(sample, load_codec_config(name))
        sizes.append({"codec": name, "k": r.k, "ids": r.ids_bytes_per_token,
                      "values": r.values_bytes_per_token, "total": r.bytes_per_token,
                      "kl_full_mean": r.kl_full_mean, "top1": r.top1_agreement})
    for n, path in sampled.items():
        r = evaluate_sampled(ref, Dataset(str(path)))
        sizes.append({"codec": f"sampled-{n}", "k": n, "ids": r.ids_bytes_per_token,
                      "values": r.values_bytes_per_token, "total": r.bytes_per_token,
                      "top1": r.top1_agreement, **r.extra,
                      "decode_tokens_per_s": r.decode_tokens_per_s,
                      "encode_tokens_per_s": r.encode_tokens_per_s})

    runs = []
    if not args.no_train:
        recipes = (("default", default, None),
                   (f"sampled-{preset_draws}", sampled[preset_draws],
                    "[{kind: sampled, weight: 0.8}, {kind: ce, weight: 0.2}]"))
        for seed in range(args.repeats):
            for name, data, terms in recipes:
                runs.append(train(name, data, heldout, args, seed, terms))
                took = runs[-1]["train_seconds"]
                print(f"seed {seed} {name:<12} held-out KL {runs[-1]['kl_before']:.4f} -> "
                      f"{runs[-1]['kl_after']:.4f} "
                      f"({'read back' if took is None else f'{took:.0f} s'})")

    print(f"\n(a) {sum(sample.rows)} positions of {len(sample.rows)} documents; bytes per "
          f"token as stored (ids + values)")
    print(f"{'codec':<12}{'ids':>7}{'values':>8}{'total':>8}{'ids/row':>9}{'CE est. err':>13}"
          f"{'+- s.e.':>9}{'TV':>7}{'top-1':>7}{'KL full':>10}")
    for s in sizes:
        sampled_row = "sample_ce_bias" in s
        print(f"{s['codec']:<12}{s['ids']:>7.1f}{s['values']:>8.1f}{s['total']:>8.1f}"
              + (f"{s['distinct_ids_per_row']:>9.1f}{s['sample_ce_bias']:>+13.4f}"
                 f"{s['sample_ce_bias_stderr']:>9.4f}{s['sample_tv_mean']:>7.3f}"
                 f"{s['top1']:>7.3f}{'-':>10}" if sampled_row else
                 f"{'-':>9}{'-':>13}{'-':>9}{'-':>7}{s['top1']:>7.3f}{s['kl_full_mean']:>10.2e}"))
    mean = {}
    if runs:
        print(f"\n(b) held-out KL after {args.steps} steps of the demo recipe")
        print(f"{'seed':<6}{'data':<14}{'KL before':>11}{'KL after':>11}{'top-1':>8}"
              f"{'KL full':>10}")
        for r in runs:
            full = r.get("kl_full_after")
            print(f"{r['seed']:<6}{r['data']:<14}{r['kl_before']:>11.4f}{r['kl_after']:>11.4f}"
                  f"{r['top1_after']:>8.3f}{'-' if full is None else format(full, '.4f'):>10}")
        mean = {name: float(np.mean([r["kl_after"] for r in runs if r["data"] == name]))
                for name in dict.fromkeys(r["data"] for r in runs)}
        a, b = mean["default"], mean[f"sampled-{preset_draws}"]
        print(f"mean KL after: default {a:.4f}, sampled-{preset_draws} {b:.4f} "
              f"({(b - a) / a:+.2%} against default)")

    m = ref.manifest
    report = {"sizes": sizes, "training": runs, "kl_after_mean": mean,
              "documents": m.documents, "tokens": m.tokens,
              "sampled_codec": load_codec_config("sampled").to_dict()}
    write_report(args.out, report, args, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
