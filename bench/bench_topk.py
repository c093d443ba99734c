"""What the LM head and the exact top-k of ``capture.topk`` cost per token, stage by stage.

    python bench/bench_topk.py [--tokens 16384] [--chunk 2097] [--top-k 128] [--repeats 20]
        [--json bench/results/topk_h200.json]
    python bench/bench_topk.py --tiny          # smoke run on CPU

A capture computes the LM head at every position, then the top-k of each row (a plain
prefill computes it at the last position only), so these two are what separates a capture
from the prefill it is measured against. The shapes are AFM-4.5B's (hidden 2560, vocabulary
128,004, padded to 128,064 as vLLM pads it), in chunks of ``--chunk`` rows as vLLM's workers
form them (``LOGIT_ELEMENTS // vocab``); bf16 logits as random normals of scale 3.

Rows: the head alone; head + top-k; then each stage of ``topk_logprobs`` on one chunk of
logits: the one-pass log-normalizer and group maxima, the top-k groups, gathering their
candidates in id order, the candidates' top-k, and the whole function, also with the other
group sizes of ``--groups``.
Each row: one warm-up, then ``--repeats`` timed runs; microseconds per token (median, min-max).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from afm import AFM_4P5B, print_table, write_json
from kdpipe.capture import topk as T

PAD = 64     # vLLM pads the vocabulary of its LM head to a multiple of this


def timed(fn, tokens: int, repeats: int, device: str) -> dict:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    per_token = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        per_token.append((time.perf_counter() - t0) / tokens * 1e6)
    return {"us_per_token": statistics.median(per_token), "min": min(per_token),
            "max": max(per_token), "repeats": per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: small shapes")
    ap.add_argument("--tokens", type=int, default=None, help="default 16384 (tiny: 256)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="rows per head call (default: vLLM workers' 2**28 // vocab; tiny: 64)")
    ap.add_argument("--top-k", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--groups", default="16,32,64,128",
                    help="group sizes to time the whole top-k with (the result is the same)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --tiny on CPU")
    vocab = 4000 if a.tiny else AFM_4P5B["vocab_size"]
    hidden = 64 if a.tiny else AFM_4P5B["hidden_size"]
    tokens = a.tokens or (256 if a.tiny else 16384)
    chunk = a.chunk or (64 if a.tiny else (1 << 28) // vocab)
    k = a.top_k or (16 if a.tiny else 128)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    g = torch.Generator(device).manual_seed(0)
    padded = -(-vocab // PAD) * PAD
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
    w = torch.randn(padded, hidden, device=device, dtype=dtype, generator=g) / hidden ** 0.5

    def head(topk: bool):
        for s in range(0, tokens, chunk):
            logits = F.linear(h[s:s + chunk], w)[:, :vocab]
            if topk:
                T.topk_logprobs(logits, k)

    logits = (torch.randn(chunk, padded, device=device, generator=g) * 3).to(dtype)[:, :vocab]
    _, gmax = T.logsum_and_group_max(logits)
    n_groups = gmax.shape[1]
    order = torch.arange(n_groups, device=device)
    width = k * T.GROUP
    positions = torch.arange(width, device=device)

    def top_groups():
        return T._topk_by_key(gmax.to(dtype), order, k, n_groups)

    groups = top_groups()

    def candidates():
        ids = (groups.sort(dim=-1).values[:, :, None] * T.GROUP
               + torch.arange(T.GROUP, device=device)).view(chunk, -1)
        real = ids < vocab
        return logits.gather(1, torch.where(real, ids, 0)).masked_fill(~real, float("-inf"))

    vals = candidates()
    rows = [dict(what=f"LM head ({hidden} x {padded}), chunks of {chunk}",
                 **timed(lambda: head(False), tokens, a.repeats, device)),
            dict(what=f"LM head + top-{k}", **timed(lambda: head(True), tokens, a.repeats,
                                                     device))]
    stages = [("top-k: log-normalizer and group maxima (one pass)",
               lambda: T.logsum_and_group_max(logits)),
              (f"top-k: top {k} of {n_groups} groups (keys + top-k)", top_groups),
              (f"top-k: their {width} candidates in id order", candidates),
              (f"top-k: top {k} candidates (keys + top-k)",
               lambda: T._topk_by_key(vals, positions, k, width)),
              ("top-k: whole topk_logprobs", lambda: T.topk_logprobs(logits, k))]
    stages += [(f"top-k: whole, groups of {size}",
                lambda size=size: T.topk_logprobs(logits, k, group=size))
               for size in map(int, a.groups.split(",")) if size != T.GROUP]
    rows += [dict(what=what, **timed(fn, chunk, a.repeats, device)) for what, fn in stages]
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{machine}: {tokens} tokens, vocabulary {vocab}, top-{k}, {a.repeats} repeats")
    print_table("microseconds per token (median, min-max)", rows,
                [("what", "what", "s"), ("us_per_token", "median", ".3f"), ("min", "min", ".3f"),
                 ("max", "max", ".3f")])
    write_json(a.json, {"machine": machine, "tokens": tokens, "chunk": chunk, "vocab": vocab,
                        "hidden": hidden, "top_k": k, "dtype": str(dtype), "repeats": a.repeats,
                        "rows": rows})


if __name__ == "__main__":
    main()
