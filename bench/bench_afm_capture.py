"""Capture throughput at AFM-4.5B scale: plain forward vs the full capture, one GPU, one run.

    python bench/bench_afm_capture.py --tokenizer DIR [--work /dev/shm/kdpipe-afm] [--docs 64]
        [--seq-len 4096] [--batch-tokens 32768] [--hidden-layers 9,18,27,36] [--codec default]
        [--keep DS] [--json bench/results/afm_capture.json]

The teacher is AFM-4.5B's architecture with random bf16 weights (``bench/afm.py``); documents
are the embedded corpus joined to at least ``--seq-len`` tokens and cut there, so every batch is
``batch_tokens / seq_len`` full sequences. Rows, all over the same batches:

* plain forward: ``model(ids, attention_mask).logits`` (bf16 logits of every position);
* body: the decoder without the LM head (the floor any capture pays);
* body + head + top-k: what the capture backend computes per batch (LM head in chunks, the
  one-pass log-normalizer/top-k of ``capture.topk``, hidden-state hooks), kept on the GPU;
* full capture: ``kdpipe capture`` itself (tokenize, the above, hidden states and top-k encoded
  with ``--codec``, Parquet shards and fragment commits on local disk, writes overlapping the
  next window's forward).

MFU counts 2 x (matmul weights) + causal attention FLOPs per token against the bf16 matmul
rate measured at the start of the run on the same GPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from afm import (attention_flops_per_token, gpu_name, linear_params, long_documents,
                 matmul_tflops, print_table, random_afm_teacher, synced, write_json)
from kdpipe.capture.backends import parse_hidden_layers
from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.capture.topk import topk_logprobs


def batches_of(data: Path, tokenizer, seq_len: int, per_batch: int, docs: int) -> list:
    import json
    seqs = [tokenizer(json.loads(line)["text"])["input_ids"][:seq_len]
            for line in data.read_text().splitlines()[:docs]]
    ids = torch.tensor(np.array(seqs, dtype=np.int64))
    return [ids[i:i + per_batch] for i in range(0, len(ids), per_batch)]


@torch.inference_mode()
def timed(fn, batches: list) -> float:
    """tokens/s of ``fn`` over all batches, after one warm-up batch."""
    fn(batches[0].cuda())
    t0 = synced()
    for b in batches:
        fn(b.cuda())
    return sum(b.numel() for b in batches) / (synced() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a directory with tokenizer files")
    ap.add_argument("--work", default="/dev/shm/kdpipe-afm")
    ap.add_argument("--keep", default=None, help="write the capture here and keep it (default: "
                                                 "a temporary directory on disk, deleted)")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--hidden-layers", default="9,18,27,36")
    ap.add_argument("--codec", default="default")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    peak = matmul_tflops()
    teacher = random_afm_teacher(work / "teacher", Path(a.tokenizer))
    data = work / f"long-{a.docs}x{a.seq_len}.jsonl"
    if not data.exists():
        long_documents(data, Path(a.tokenizer), n_docs=a.docs, min_tokens=a.seq_len)
    tok = AutoTokenizer.from_pretrained(teacher)
    batches = batches_of(data, tok, a.seq_len, max(1, a.batch_tokens // a.seq_len), a.docs)

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16).cuda().eval()
    cfg = model.config
    flops = 2 * linear_params(model) + attention_flops_per_token(cfg, a.seq_len,
                                                                  cfg.num_hidden_layers)
    layers = parse_hidden_layers(a.hidden_layers, cfg.num_hidden_layers)
    head = model.get_output_embeddings()
    kept = []
    for layer in layers:   # the capture backend's hooks: keep a reference per captured layer
        module = model.model.embed_tokens if layer == 0 else model.model.layers[layer - 1]
        module.register_forward_hook(lambda m, i, o: kept.append(o[0] if isinstance(o, tuple)
                                                                 else o))

    def plain(ids):
        kept.clear()
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    def body(ids):
        kept.clear()
        return model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def body_head_topk(ids, chunk=2048):
        h = body(ids).flatten(0, 1)
        return [topk_logprobs(head(h[s:s + chunk]), a.top_k) for s in range(0, len(h), chunk)]

    rows = [{"what": "plain forward (.logits)", "tokens_per_s": timed(plain, batches)},
            {"what": "body (no LM head)", "tokens_per_s": timed(body, batches)},
            {"what": "body + head + top-k (GPU only)", "tokens_per_s": timed(body_head_topk,
                                                                             batches)}]
    fwd_mem = torch.cuda.max_memory_allocated() / 2**30
    del model, head, kept
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        s = run_capture(CaptureOptions(
            model=str(teacher), data=str(data), out=a.keep or str(Path(tmp) / "ds"), limit=a.docs,
            max_seq_len=a.seq_len, batch_tokens=a.batch_tokens, window=a.window, device="cuda",
            dtype="bfloat16", codec=a.codec, hidden_layers=a.hidden_layers, top_k=a.top_k,
            chat_template=False, progress=False))
    rows.append({"what": f"full capture ({a.codec}, hidden {a.hidden_layers})",
                 "tokens_per_s": s.tokens / s.seconds})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_forward"] = r["tokens_per_s"] / base
        r["mfu"] = r["tokens_per_s"] * flops / (peak * 1e12)
    print(f"AFM-4.5B (random bf16 weights), {gpu_name()}, {s.tokens} tokens = {len(batches)} "
          f"batches of {batches[0].shape[0]} x {a.seq_len}; bf16 matmul peak measured "
          f"{peak:.0f} TFLOP/s; {flops / 1e9:.2f} GFLOP/token; top-{a.top_k}")
    print_table("capture throughput", rows, [("what", "what", "s"),
                                             ("tokens_per_s", "tokens/s", ".0f"),
                                             ("vs_forward", "vs forward", ".3f"),
                                             ("mfu", "MFU", ".1%")])
    print(f"capture output {s.bytes_per_token:.0f} bytes/token (ids + values + hidden); "
          f"peak GPU memory of the forward rows {fwd_mem:.1f} GiB")
    print_table(f"where the capture's {s.seconds:.1f} s went, as it records them (stages nest; "
                f"threads overlap)", [{"what": k, "s": v} for k, v in s.stages.items()],
                [("what", "stage", "s"), ("s", "seconds", ".2f")])
    write_json(a.json, {"stages_s": s.stages, "machine": gpu_name(), "matmul_tflops": peak,
                        "gflop_per_token": flops / 1e9, "seq_len": a.seq_len,
                        "batch_tokens": a.batch_tokens, "tokens": s.tokens, "codec": a.codec,
                        "hidden_layers": a.hidden_layers, "top_k": a.top_k,
                        "capture_bytes_per_token": s.bytes_per_token, "rows": rows})


if __name__ == "__main__":
    main()
