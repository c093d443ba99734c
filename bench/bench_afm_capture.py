"""Capture throughput at AFM-4.5B scale: plain forward vs the full capture, medians of repeats.

    python bench/bench_afm_capture.py [--tokenizer DIR] [--work /dev/shm/kdpipe-afm]
        [--repeats 3] [--steps 20] [--seq-len 4096] [--batch-tokens 32768]
        [--hidden-layers 9,18,27,36] [--codec default] [--writer process,thread]
        [--out-dir DIR] [--keep DS] [--json bench/results/afm_capture.json]
    python bench/bench_afm_capture.py --tiny      # the same rows, a tiny random model, CPU

The teacher is AFM-4.5B's architecture with random bf16 weights (``bench/afm.py``; ``--tiny``:
a 4-layer 64-wide one in float32 on the CPU); documents are the embedded corpus joined to at
least ``--seq-len`` tokens and cut there, so every batch is ``batch_tokens / seq_len`` full
sequences and every capture window is one batch. One process, one loaded model; each row is
run ``--repeats`` times and reported as the median (and min-max) of its repeats:

* plain forward: ``model(ids, attention_mask).logits`` (logits of every position), one
  warm-up batch then ``--steps`` timed ones;
* body + head + top-k (GPU only): what the capture backend computes per batch (LM head in
  chunks, the one-pass top-k of ``capture.topk``, hidden-state hooks), kept on the device;
* full capture, per ``--writer``: ``run_capture`` itself with the model above (tokenize, the
  above, hidden states and top-k encoded with ``--codec``, Parquet shards and a commit per
  window in ``--out-dir``), over ``steps + 3`` windows. Steady state: the windows after the
  first two, up to the one before the last, timed by their hand-off to the writer (which waits
  for a free slot, so a slow writer shows); end to end: every token over the whole run,
  writer start-up and the last window's write included. ``forward in capture``: the capture's
  tokens over its main-process ``forward`` seconds, to compare with the GPU-only row.

MFU counts 2 x (matmul weights) + causal attention FLOPs per token against the bf16 matmul
rate measured at the start of the run on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from afm import (attention_flops_per_token, gpu_name, linear_params, long_documents,
                 matmul_tflops, print_table, random_afm_teacher, random_teacher, synced,
                 tiny_config, write_json)
from kdpipe.capture.backends import parse_hidden_layers
from kdpipe.capture.run import CaptureOptions, make_backend, run_capture
from kdpipe.capture.teacher import prepare_embedded_teacher
from kdpipe.capture.topk import topk_logprobs

WARM_WINDOWS = 2     # capture windows before the steady state (writer start-up, first copies)


def batches_of(data: Path, tokenizer, seq_len: int, per_batch: int, docs: int) -> list:
    seqs = [tokenizer(json.loads(line)["text"])["input_ids"][:seq_len]
            for line in data.read_text().splitlines()[:docs]]
    ids = torch.tensor(np.array(seqs, dtype=np.int64))
    return [ids[i:i + per_batch] for i in range(0, len(ids), per_batch)]


@torch.inference_mode()
def timed(fn, batches: list, device: str) -> dict:
    """tokens/s of ``fn`` over the batches after the first (a warm-up)."""
    fn(batches[0].to(device))
    t0 = synced()
    for b in batches[1:]:
        fn(b.to(device))
    seconds = synced() - t0
    tokens = sum(b.numel() for b in batches[1:])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def capture_once(opts: CaptureOptions, backend) -> dict:
    s = run_capture(opts, backend=backend)
    t, n = zip(*s.windows)
    first, last = WARM_WINDOWS, len(t) - 2          # steady: windows first+1 .. last
    steady_tokens = sum(n[first + 1:last + 1])
    return {"tokens": s.tokens, "seconds": s.seconds, "tokens_per_s": s.tokens / s.seconds,
            "steady_windows": last - first, "steady_tokens": steady_tokens,
            "steady_seconds": t[last] - t[first],
            "steady_tokens_per_s": steady_tokens / (t[last] - t[first]),
            "forward_tokens_per_s": s.tokens / s.stages["forward"],
            "bytes_per_token": s.bytes_per_token, "stages_s": s.stages}


def summarize(what: str, repeats: list[dict], key: str = "tokens_per_s") -> dict:
    values = [r[key] for r in repeats]
    return {"what": what, "tokens_per_s": statistics.median(values), "min": min(values),
            "max": max(values), "repeats": repeats, "key": key}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None, help="a directory with tokenizer files "
                    "(default: the embedded teacher's)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random model on the CPU (a smoke run of every row)")
    ap.add_argument("--work", default=None,
                    help="teacher and corpus cache (default /dev/shm/kdpipe-afm[-tiny])")
    ap.add_argument("--out-dir", default=None, help="where captures are written (default: a "
                    "temporary directory on disk); each repeat's output is deleted")
    ap.add_argument("--keep", default=None, help="keep the last capture here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20,
                    help="timed batches per forward repeat; steady capture windows")
    ap.add_argument("--seq-len", type=int, default=None, help="default 4096 (--tiny: 256)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default 32768 (--tiny: 2048)")
    ap.add_argument("--hidden-layers", default=None, help="default 9,18,27,36 (--tiny: 1,2,3,4)")
    ap.add_argument("--codec", default="default")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--writer", default="process",
                    help="comma list of capture writers to measure: process, thread")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    seq_len = a.seq_len or (256 if a.tiny else 4096)
    batch_tokens = a.batch_tokens or (2048 if a.tiny else 32768)
    hidden_layers = a.hidden_layers or ("1,2,3,4" if a.tiny else "9,18,27,36")
    device, dtype = ("cpu", torch.float32) if a.tiny else ("cuda", torch.bfloat16)
    tokenizer_dir = Path(a.tokenizer or prepare_embedded_teacher())
    work = Path(a.work or ("/dev/shm/kdpipe-afm-tiny" if a.tiny else "/dev/shm/kdpipe-afm"))
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer
    t_setup = time.time()
    peak = None if a.tiny else matmul_tflops()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    teacher = (random_teacher(work / "teacher", tokenizer_dir, tiny_config(len(tok)),
                              device="cpu", dtype=torch.float32) if a.tiny
               else random_afm_teacher(work / "teacher", tokenizer_dir))
    per_batch = max(1, batch_tokens // seq_len)
    windows = a.steps + WARM_WINDOWS + 2     # warm-up, steady, the window that opens it, last
    docs = windows * per_batch
    data = work / f"long-{docs}x{seq_len}.jsonl"
    if not data.exists():
        long_documents(data, tokenizer_dir, n_docs=docs, min_tokens=seq_len)
    batches = batches_of(data, tok, seq_len, per_batch, (a.steps + 1) * per_batch)

    opts = CaptureOptions(model=str(teacher), data=str(data), out="", limit=docs,
                          max_seq_len=seq_len, batch_tokens=per_batch * seq_len, window=per_batch,
                          device=device, dtype=str(dtype).removeprefix("torch."), codec=a.codec,
                          hidden_layers=hidden_layers, top_k=a.top_k, chat_template=False,
                          progress=False)
    layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    backend = make_backend(opts, str(teacher), device, opts.dtype,
                           parse_hidden_layers(hidden_layers, layers))
    model = backend.model
    cfg = model.config
    flops = 2 * linear_params(model) + attention_flops_per_token(cfg, seq_len,
                                                                  cfg.num_hidden_layers)
    head = model.get_output_embeddings()
    print(f"setup {time.time() - t_setup:.0f} s", flush=True)

    def plain(ids):     # the backend's hooks keep their references, as in the capture
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    def body_head_topk(ids, chunk=2048):
        h = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        h = h.flatten(0, 1)
        return [topk_logprobs(head(h[s:s + chunk]), a.top_k) for s in range(0, len(h), chunk)]

    rows = [summarize("plain forward (.logits)",
                      [timed(plain, batches, device) for _ in range(a.repeats)]),
            summarize("body + head + top-k (GPU only)",
                      [timed(body_head_topk, batches, device) for _ in range(a.repeats)])]
    fwd_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    base = Path(a.out_dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    last = None
    for writer in a.writer.split(","):
        repeats = []
        for i in range(a.repeats):
            out = Path(tempfile.mkdtemp(prefix="kdpipe-afm-capture-", dir=base)) / "ds"
            try:
                repeats.append(capture_once(CaptureOptions(**(vars(opts) | dict(
                    out=str(out), writer=writer))), backend))
                print(f"capture ({writer}) repeat {i}: {repeats[-1]['tokens_per_s']:.0f} "
                      f"tokens/s end to end", flush=True)
                if a.keep and writer == a.writer.split(",")[-1] and i == a.repeats - 1:
                    shutil.rmtree(a.keep, ignore_errors=True)
                    shutil.move(str(out), a.keep)
            finally:
                shutil.rmtree(out.parent, ignore_errors=True)
        what = f"capture, {writer} writer"
        rows += [summarize(f"{what}: steady state", repeats, "steady_tokens_per_s"),
                 summarize(f"{what}: end to end", repeats),
                 summarize(f"{what}: forward in capture", repeats, "forward_tokens_per_s")]
        last = repeats[-1]
    backend.close()
    ref = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_forward"] = r["tokens_per_s"] / ref
        r["mfu"] = None if peak is None else r["tokens_per_s"] * flops / (peak * 1e12)
    model_name = "tiny random AFM-like (4 x 64, fp32, CPU)" if a.tiny else \
        f"AFM-4.5B (random bf16 weights), {gpu_name()}"
    print(f"\n{model_name}; batches of {per_batch} x {seq_len}; {a.steps} timed batches or "
          f"steady windows per repeat, {a.repeats} repeats (median, min-max); "
          + ("" if peak is None else f"bf16 matmul peak measured {peak:.0f} TFLOP/s; ")
          + f"{flops / 1e9:.2f} GFLOP/token; top-{a.top_k}, codec {a.codec}, hidden "
          f"{hidden_layers}")
    print_table("capture throughput (tokens/s)", rows, [
        ("what", "what", "s"), ("tokens_per_s", "median", ".0f"), ("min", "min", ".0f"),
        ("max", "max", ".0f"), ("vs_forward", "vs forward", ".3f"), ("mfu", "MFU", ".1%")])
    print(f"capture output {last['bytes_per_token']:.0f} bytes/token (ids + values + hidden); "
          f"peak GPU memory of the forward rows {fwd_mem:.1f} GiB")
    print_table("where the last capture's seconds went, as it records them (stages nest; the "
                "writer and its threads overlap the forward)",
                [{"what": k, "s": v} for k, v in sorted(last["stages_s"].items(),
                                                        key=lambda kv: -kv[1])],
                [("what", "stage", "s"), ("s", "seconds", ".2f")])
    write_json(a.json, {"machine": "cpu" if a.tiny else gpu_name(), "tiny": a.tiny,
                        "matmul_tflops": peak, "gflop_per_token": flops / 1e9,
                        "seq_len": seq_len, "batch_tokens": per_batch * seq_len,
                        "steps": a.steps, "repeats": a.repeats, "codec": a.codec,
                        "hidden_layers": hidden_layers, "top_k": a.top_k,
                        "out_dir": str(base), "rows": rows})


if __name__ == "__main__":
    main()
