"""Stage-1 hidden-state recipes that fit on disk: quality at equal steps against bytes per token.

The blog's stage 1 aligns every layer's output for ~300M tokens; stored offline (fp8) that is
36 layers x 2,562 bytes per token at AFM-4.5B, about 9 TB per 100M tokens. On the embedded
teacher (SmolLM2-135M-Instruct, 30 layers x 576) this compares, at equal steps from the same
converted 3:1 student, the stage-1 loss (0.2 CE + 0.2 KL at T=2 + 0.6 hidden cosine) with its
hidden targets taken from:

* ``all``: every layer's output (fp8);
* ``every4``: every 4th layer's output (fp8);
* ``attn``: every layer's attention-block output (fp8), matched by the student's token mixers;
* ``lowrank``: every layer's output, low-rank codec (rank H/10, fp8 coefficients);
* ``attn-lowrank``: attention-block outputs, low-rank codec;

and, without hidden states, the demo recipe (0.8 KL + 0.2 CE) from ``default`` and from
``exact`` shards. Every student is scored on the exact held-out capture: KL (teacher ||
student, top-k + tail bucket), top-1 agreement, and free-running agreement (greedy
continuations against the teacher's, ``kdpipe eval --generate``).

Bytes per token at AFM are the hidden-state columns' codec rows at AFM's width (fp8: a bf16
scale + 1 byte per dimension; low rank: a bf16 scale + 1 byte per coefficient, rank 256 =
2560/10) times the layers stored (36, or 9 for every 4th), i.e. what the option adds to the
top-k; the measured bytes per token of each dataset on the embedded teacher are listed too.

    python bench/bench_stage1.py --out bench/results/stage1_cpu.json

prints a table and writes the JSON (every run). Defaults: the demo's capture (48 records of
128 tokens) and 32 of its 48 steps (a shared 2-core CPU); --seeds 0,1 repeats every training.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdpipe.compress import Dataset, load_codec_config  # noqa: E402
from kdpipe.student_train.train_config import load_config  # noqa: E402

from embedded import capture, student  # noqa: E402

KDPIPE = str(Path(sys.executable).with_name("kdpipe"))
AFM_LAYERS, AFM_HIDDEN = 36, 2560          # bench/afm.py's AFM_4P5B
RANK_FRACTION = 10                          # low rank: hidden_size / 10 coefficients
SCALE_BYTES = 2                             # the fp8 codecs' bf16 per-token scale
STAGE1_TERMS = ("[{kind: ce, weight: 0.2}, {kind: kl, weight: 0.2, temperature: 2.0}, "
                "{kind: hidden_cosine, weight: 0.6}]")



def compress(src: Path, out: Path, codec: dict | str) -> Path:
    """``kdpipe compress`` of ``src`` into ``out`` (a low-rank codec fits its projection)."""
    if not (out / "manifest.json").exists():
        if isinstance(codec, dict):
            path = out.with_suffix(".yaml")
            path.write_text(yaml.safe_dump(codec))
            codec = str(path)
        subprocess.run([KDPIPE, "compress", str(src), str(out), "--codec", codec], check=True)
    return out


def lowrank_codec(hidden_size: int) -> dict:
    """``default``'s top-k codec with low-rank hidden states of rank hidden_size / 10."""
    d = load_codec_config("default").to_dict()
    rank = round(hidden_size / RANK_FRACTION)
    d.update(name=f"default-lowrank{rank}", hidden={"kind": "lowrank", "rank": rank,
                                                     "coeff_dtype": "fp8"})
    return d


def afm_hidden_bytes(layers: int, codec: str) -> int:
    """Hidden-state bytes per token at AFM-4.5B's width for ``layers`` stored layers."""
    if codec == "none":
        return 0
    width = AFM_HIDDEN // RANK_FRACTION if codec == "lowrank" else AFM_HIDDEN
    return layers * (SCALE_BYTES + width)



def train(name: str, data: Path, heldout: Path, overrides: list[str], args, seed: int) -> Path:
    from kdpipe.student_train.trainer import Trainer
    out = args.workdir / f"train-{name}-seed{seed}"
    if (out / "final" / "config.json").exists() and not args.retrain:
        return out
    cfg = load_config(ROOT / "student_train" / "configs" / "demo.yaml", [
        f"out={out}", f"data.path={data}", f"eval.data={heldout}",
        f"student.path={student(args.workdir, seed)}", "student.teacher=null",
        f"train.max_steps={args.steps}", f"data.seed={seed}", f"train.seed={seed}",
        "train.device=cpu", "log.progress=false", "log.tensorboard=false",
        "eval.at_start=false", "eval.every=0", "eval.max_tokens=0", *overrides])
    t0 = time.time()
    Trainer(cfg, overwrite=True).train()
    (out / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    return out


def last_eval(run: Path) -> dict:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_stage1")
    p.add_argument("--limit", type=int, default=48, help="corpus records to capture")
    p.add_argument("--heldout-limit", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seeds", default="0", help="comma list of training seeds")
    p.add_argument("--only", default="", help="comma list of options to run (default: all; "
                   "`converted` is the converted student's row)")
    p.add_argument("--prompts", type=int, default=8, help="free-running: held-out prompts")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--retrain", action="store_true", help="retrain runs already in workdir")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    w = args.workdir

    corpus = w / "corpus" / "train.jsonl"
    if not corpus.exists():
        subprocess.run([KDPIPE, "corpus", "build", "--out", str(corpus)], check=True)
    common = dict(limit=args.limit, max_seq_len=args.max_seq_len)
    heldout = capture(corpus.with_name("heldout.jsonl"), w / "heldout", codec="exact",
                      limit=args.heldout_limit, max_seq_len=args.max_seq_len)
    res_exact = capture(corpus, w / "residual-exact", codec="exact", hidden_layers="all",
                        **common)
    attn_exact = capture(corpus, w / "attn-exact", codec="exact", hidden_layers="all",
                         hidden_source="attention", **common)
    teacher = Dataset(str(res_exact)).manifest.teacher
    L, H = teacher.num_hidden_layers, teacher.hidden_size
    lowrank = lowrank_codec(H)
    res_fp8 = compress(res_exact, w / "residual-default", "default")
    res_low = compress(res_exact, w / "residual-lowrank", lowrank)
    attn_fp8 = compress(attn_exact, w / "attn-default", "default")
    attn_low = compress(attn_exact, w / "attn-lowrank", lowrank)

    every4 = [[i, i] for i in range(4, L + 1, 4)]
    stage1 = [f"loss.terms={STAGE1_TERMS}"]
    # name: (data, overrides, layers stored at AFM, hidden codec at AFM)
    options = {
        "all": (res_fp8, stage1, AFM_LAYERS, "fp8"),
        "every4": (res_fp8, stage1 + [f"loss.layer_map={every4}"], AFM_LAYERS // 4, "fp8"),
        "attn": (attn_fp8, stage1, AFM_LAYERS, "fp8"),
        "lowrank": (res_low, stage1, AFM_LAYERS, "lowrank"),
        "kl-ce-default": (res_fp8, [], 0, "none"),
        "kl-ce-exact": (res_exact, [], 0, "none"),
        "attn-lowrank": (attn_low, stage1, AFM_LAYERS, "lowrank"),
    }
    chosen = [o for o in args.only.split(",") if o] or ["converted", *options]
    unknown = sorted(set(chosen) - set(options) - {"converted"})
    if unknown:
        sys.exit(f"--only {unknown}: options are converted, {', '.join(options)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    from kdpipe.student_train.evaluate import evaluate_student, load_student
    from kdpipe.student_train.generate_eval import (compare, default_teacher, greedy,
                                                    heldout_prompts, load_teacher)
    # free-running: the teacher's continuations once, every student against them
    prompts = heldout_prompts(str(heldout), prompts=args.prompts, prompt_len=args.prompt_len)
    teacher_tokens = greedy(load_teacher(default_teacher(str(heldout))), prompts, args.new_tokens)

    def free_running(model_dir: str) -> dict:
        g = compare(load_student(model_dir).eval(), None, prompts, args.new_tokens,
                    teacher_tokens=teacher_tokens)
        return {"gen_agreement": g.gen_agreement, "gen_match": g.gen_match, "gen_ce": g.gen_ce}

    def report(runs: list[dict]) -> None:
        """The JSON so far: written after every run, so a stopped bench keeps what it did."""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "runs": runs, "layers": L, "hidden_size": H, "lowrank_codec": lowrank,
            "afm": {"layers": AFM_LAYERS, "hidden_size": AFM_HIDDEN,
                    "lowrank_rank": AFM_HIDDEN // RANK_FRACTION},
            "args": {k: str(v) for k, v in vars(args).items()},
            "seconds": time.time() - t_start, "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}, indent=1))

    runs = []
    for seed in seeds if "converted" in chosen else ():   # where every option starts
        m = evaluate_student(str(student(w, seed)), str(heldout), seq_len=args.max_seq_len,
                             device="cpu")
        runs.append({"option": "converted", "seed": seed, "run": str(student(w, seed)),
                     "kl": m["kl"], "top1": m["top1"], "ce": m["ce"], "steps": 0,
                     **free_running(str(student(w, seed)))})
        report(runs)
    for seed in seeds:
        for name in (c for c in chosen if c != "converted"):
            data, overrides, afm_layers, afm_codec = options[name]
            out = train(name, data, heldout, overrides, args, seed)
            ev = last_eval(out)
            m = Dataset(str(data)).manifest
            runs.append({"option": name, "seed": seed, "run": str(out), "data": str(data),
                         "overrides": overrides, "kl": ev["kl"], "top1": ev["top1"],
                         "ce": ev["ce"], "steps": ev["step"],
                         "train_seconds": float((out / "train_seconds.txt").read_text())
                         if (out / "train_seconds.txt").exists() else None,
                         "bytes_per_token_here": m.total_bytes / m.tokens,
                         "afm_hidden_bytes_per_token": afm_hidden_bytes(afm_layers, afm_codec),
                         "afm_tb_per_100m_tokens":
                             afm_hidden_bytes(afm_layers, afm_codec) * 1e8 / 1e12,
                         **free_running(str(out / "final"))})
            report(runs)
            r = runs[-1]
            print(f"seed {seed} {name:<14} held-out KL {r['kl']:.4f} top-1 {r['top1']:.3f} "
                  f"free-running {r['gen_agreement']:.3f}", flush=True)

    print(f"\n{args.steps} steps from the converted 3:1 student, seeds {args.seeds}; "
          f"held-out {args.heldout_limit} documents; free-running {args.prompts} prompts x "
          f"{args.new_tokens} tokens")
    print(f"{'option':<15}{'seed':>5}{'KL':>9}{'top-1':>8}{'gen agr':>9}{'gen CE':>8}"
          f"{'B/tok here':>12}{'AFM B/tok':>11}{'TB/100M':>9}")
    for r in runs:
        here = r.get("bytes_per_token_here")
        afm = r.get("afm_hidden_bytes_per_token")
        print(f"{r['option']:<15}{r['seed']:>5}{r['kl']:>9.4f}{r['top1']:>8.3f}"
              f"{r['gen_agreement']:>9.3f}{r['gen_ce']:>8.3f}"
              f"{'' if here is None else f'{here:.0f}':>12}"
              f"{'' if afm is None else f'{afm:,}':>11}"
              f"{'' if afm is None else f'{afm * 1e8 / 1e12:.2f}':>9}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
