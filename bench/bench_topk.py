"""What the LM head and the exact top-k of ``capture.topk`` cost per token, stage by stage.

    python bench/bench_topk.py [--tokens 16384] [--chunk 2097] [--top-k 128] [--repeats 20]
        [--groups 16,32,64,128] [--warps 4,8,16] [--json bench/results/topk_h200.json]
    python bench/bench_topk.py --tiny          # smoke run on CPU

A capture computes the LM head at every position, then the top-k of each row (a plain
prefill computes it at the last position only), so these two are what separates a capture
from the prefill it is measured against. The shapes are AFM-4.5B's (hidden 2560, vocabulary
128,004, padded to 128,064 as vLLM pads it), in chunks of ``--chunk`` rows as vLLM's workers
form them (``LOGIT_ELEMENTS // vocab``); bf16 logits as random normals of scale 3.

Rows: the head alone; head + top-k; then on one chunk of logits, each stage of
``topk_logprobs``: the one-pass log-normalizer and group maxima, the selection of the top k
from them in torch and (on CUDA) in the Triton kernel with each ``--warps``, and the whole
function, also with the other group sizes of ``--groups``.
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
    ap.add_argument("--warps", default="4,8,16",
                    help="warps of the selection kernel's programs to time (CUDA)")
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
    logsum, gmax = T.logsum_and_group_max(logits)
    rows = [dict(what=f"LM head ({hidden} x {padded}), chunks of {chunk}",
                 **timed(lambda: head(False), tokens, a.repeats, device)),
            dict(what=f"LM head + top-{k}", **timed(lambda: head(True), tokens, a.repeats,
                                                     device))]
    stages = [("top-k: log-normalizer and group maxima (one pass)",
               lambda: T.logsum_and_group_max(logits)),
              (f"top-k: selection from {gmax.shape[1]} groups, torch",
               lambda: T.select_topk(logits, logsum, gmax, k, T.GROUP))]
    if device == "cuda" and T.triton_available():
        from kdpipe.capture import topk_kernel as K
        for warps in map(int, a.warps.split(",")):
            def select(warps=warps):
                K.SELECT_WARPS, default = warps, K.SELECT_WARPS
                try:
                    K.select_topk_cuda(logits, logsum, gmax, k, T.GROUP)
                finally:
                    K.SELECT_WARPS = default
            stages.append((f"top-k: selection, Triton kernel, {warps} warps", select))
    stages.append(("top-k: whole topk_logprobs", lambda: T.topk_logprobs(logits, k)))
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
