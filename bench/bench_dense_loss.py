"""Speed and memory of the dense loss (full teacher distribution rebuilt from its last layer)
against the top-k KL loss, at AFM-4.5B scale, in the same run.

Both run the student's LM head on the same rows; the top-k term then compares it with k
stored log-probs (plus the tail bucket), the dense term also runs the teacher's final norm
and LM head (bf16, AFM's 128k x 2560) and compares full distributions. Both are chunked
(``--chunks``) with activation checkpointing, so the backward pass recomputes each chunk's
logits. Measured per (term, chunk): forward + backward seconds, rows per second, and on CUDA
the peak memory above the inputs. Random weights and states: the arithmetic is the same as
with real ones.

On the GPU (AFM-4.5B sizes: vocab 128004, hidden 2560, 16384 rows, bf16 autocast):

    python bench/bench_dense_loss.py --json bench/results/dense_loss_h200.json

At a small scale on the CPU (float32), to check that it runs:

    python bench/bench_dense_loss.py --rows 512 --vocab 8192 --hidden 256 --chunks 128 \\
        --repeats 2 --device cpu

prints a table and writes the JSON (every repeat) where --json says.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.afm import AFM_4P5B, print_table, write_json  # noqa: E402
from kdpipe.compress.dense import TeacherHead  # noqa: E402
from kdpipe.student_train.dense_kl import DenseTerm, dense_losses  # noqa: E402
from kdpipe.student_train.sparse_kl import HeadTerm, head_losses  # noqa: E402

TERMS = {"topk_kl": [HeadTerm("kl", "kl", 1.0, "tail")],
         "dense_kl": [DenseTerm("kl", "dense_kl")],
         "dense_kl+jsd_t2": [DenseTerm("kl", "dense_kl"), DenseTerm("jsd", "dense_jsd", 2.0)]}


def inputs(rows: int, vocab: int, hidden: int, top_k: int, device: torch.device,
           head_dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    lps = torch.log_softmax(randn(rows, top_k, scale=3.0), -1) - 0.05   # leaves a tail
    lps = lps.sort(dim=-1, descending=True).values
    # k distinct ids per row: evenly spaced from a random offset
    offset = torch.randint(0, vocab, (rows, 1), generator=g, device=device)
    ids = (offset + torch.arange(top_k, device=device) * (vocab // top_k)) % vocab
    head = TeacherHead(norm="rmsnorm", norm_weight=randn(hidden, dtype=head_dtype).abs(),
                       eps=1e-5, weight=randn(vocab, hidden, scale=hidden ** -0.5,
                                              dtype=head_dtype))
    return {"h": randn(rows, hidden), "w": randn(vocab, hidden, scale=hidden ** -0.5),
            "teacher_h": randn(rows, hidden, scale=4.0), "head": head, "ids": ids, "lps": lps,
            "tail": 1.0 - lps.double().exp().sum(-1).float(),
            "has": torch.ones(rows, dtype=torch.bool, device=device),
            "labels": torch.randint(0, vocab, (rows,), generator=g, device=device)}


def step(name: str, x: dict, chunk: int, device: torch.device, bf16: bool) -> float:
    """One forward + backward of the term over every row; returns its loss."""
    h = x["h"].detach().requires_grad_(True)
    w = x["w"].detach().requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if name == "topk_kl":
            out = head_losses(h, w, topk_ids=x["ids"], topk_logprobs=x["lps"], tail=x["tail"],
                              has_teacher=x["has"], labels=x["labels"], terms=TERMS[name],
                              chunk_size=chunk)
        else:
            out = dense_losses(h, w, teacher_hidden=x["teacher_h"], head=x["head"],
                               has_teacher=x["has"], terms=TERMS[name], chunk_size=chunk)
        loss = sum(out.values()) / h.shape[0]
    loss.backward()
    return float(loss)


def measure(name: str, x: dict, chunk: int, *, device: torch.device, bf16: bool,
            warmup: int, repeats: int) -> dict:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(name, x, chunk, device, bf16)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step(name, x, chunk, device, bf16)   # float() waits for the device
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    rows = x["h"].shape[0]
    return {"term": name, "chunk": chunk, "rows": rows, "loss": loss, "seconds": seconds,
            "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
            "rows_per_s": rows / median,
            "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384, help="loss rows (positions) per step")
    ap.add_argument("--vocab", type=int, default=AFM_4P5B["vocab_size"])
    ap.add_argument("--hidden", type=int, default=AFM_4P5B["hidden_size"],
                    help="teacher and student hidden size (AFM's 3:1 student keeps 2560)")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--chunks", default="1024,2048,4096", help="comma-separated chunk sizes")
    ap.add_argument("--terms", default=",".join(TERMS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    bf16 = device.type == "cuda"     # as training runs on a GPU: bf16 autocast, bf16 teacher
    x = inputs(args.rows, args.vocab, args.hidden, args.top_k, device,
               torch.bfloat16 if bf16 else torch.float32)
    results = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        for name in args.terms.split(","):
            r = measure(name, x, chunk, device=device, bf16=bf16, warmup=args.warmup,
                        repeats=args.repeats)
            results.append(r)
            print(f"{name} chunk {chunk}: median {r['median_s'] * 1e3:.1f} ms "
                  f"({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f})", flush=True)
            write_json(args.json, {"args": vars(args), "results": results, "partial": True})
    topk = {r["chunk"]: r["median_s"] for r in results if r["term"] == "topk_kl"}
    for r in results:
        r["x_topk"] = r["median_s"] / topk[r["chunk"]] if r["chunk"] in topk else None
        r["label"] = f"{r['term']} (chunk {r['chunk']})"
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() \
        or "cpu"
    print_table(f"forward + backward over {args.rows} rows, vocab {args.vocab}, hidden "
                f"{args.hidden}, top-k {args.top_k}, {'bf16 autocast' if bf16 else 'float32'}"
                f" on {where}", results,
                [("label", "term", ""), ("median_s", "median s", ".4f"),
                 ("min_s", "min s", ".4f"), ("max_s", "max s", ".4f"),
                 ("rows_per_s", "rows/s", ",.0f"), ("x_topk", "x top-k", ".2f"),
                 ("peak_extra_gib", "peak GiB", ".2f")])
    write_json(args.json, {"args": vars(args), "device": where, "results": results})


if __name__ == "__main__":
    main()
