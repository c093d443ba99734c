"""Capture throughput: plain teacher forward vs the full capture, same model, data, batches.

    python bench/bench_capture.py [--model embedded] [--data runs/corpus/train.jsonl]
        [--limit 64] [--max-seq-len 512] [--codec exact] [--hidden-layers 10,20,30]
        [--writer auto|process|thread] [--json runs/bench/capture.json]

"plain forward" is ``model(ids, attention_mask).logits`` over the same length-sorted
batches the capture forms; "capture" is the whole `kdpipe capture` loop (tokenize,
forward, float32 top-k, hidden states, encode, Parquet write, fragment commits), with the
seconds of its stages as the capture records them; "forward inside the capture" is its tokens
over the capture's own ``forward`` seconds (what the writer leaves the forward loop).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.capture.backends import resolve_dtype
from kdpipe.capture.inputs import BadRecord, iter_part, tokenize_record
from kdpipe.capture.run import CaptureOptions, _batches, run_capture
from kdpipe.capture.teacher import locate_model
from kdpipe.runtime import resolve_device, torch_dtype


def plain_forward(model_path: str, seqs: list, device: str, dtype: str, budget: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype)).to(device)
    model.eval()
    batches = _batches([len(s) for s in seqs], budget)
    tokens = sum(len(s) for s in seqs)
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        for b in batches:
            L = max(len(seqs[i]) for i in b)
            ids = torch.zeros(len(b), L, dtype=torch.long)
            mask = torch.zeros(len(b), L, dtype=torch.long)
            for r, i in enumerate(b):
                ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return tokens / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="runs/corpus/train.jsonl")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--codec", default="exact")
    ap.add_argument("--hidden-layers", default="none")
    ap.add_argument("--writer", default="auto", choices=["auto", "process", "thread"])
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    model_path, _ = locate_model(a.model, print)
    device = str(resolve_device(a.device))
    dtype = resolve_dtype(a.dtype, device)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    seqs = []
    for _, rec in iter_part(a.data, text_field="text", num_parts=1, part=0, limit=a.limit):
        t = BadRecord("x") if isinstance(rec, BadRecord) else tokenize_record(
            rec, tok, text_field="text", chat_template=True)
        if not isinstance(t, BadRecord):
            seqs.append(t.input_ids[: a.max_seq_len])
    fwd = plain_forward(model_path, seqs, device, dtype, a.batch_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        s = run_capture(CaptureOptions(
            model=model_path, data=a.data, out=str(Path(tmp) / "ds"), limit=a.limit,
            max_seq_len=a.max_seq_len, batch_tokens=a.batch_tokens, device=device, dtype=dtype,
            codec=a.codec, hidden_layers=a.hidden_layers, progress=False, writer=a.writer))
    cap = s.tokens / s.seconds
    in_capture = s.tokens / s.stages["forward"]
    rows = [("plain forward (.logits)", fwd, 1.0),
            ("capture (top-k + hidden + write)", cap, cap / fwd),
            ("forward inside the capture", in_capture, in_capture / fwd)]
    machine = (torch.cuda.get_device_name() if device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads")
    print(f"\nmodel {a.model}, {s.tokens} tokens in {len(seqs)} docs (<= {a.max_seq_len}), "
          f"device {device} ({machine}), dtype {dtype}, codec {a.codec}, hidden "
          f"{a.hidden_layers}, writer {a.writer}")
    print(f"{'what':36} {'tokens/s':>10} {'vs forward':>10}")
    for name, tps, rel in rows:
        print(f"{name:36} {tps:10.0f} {rel:10.2f}")
    print(f"capture output: {s.bytes_per_token:.1f} bytes/token")
    print(f"where the capture's {s.seconds:.1f} s went (threads overlap):")
    for stage, seconds in sorted(s.stages.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:20} {seconds:8.2f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "model": a.model, "device": device, "machine": machine, "dtype": dtype,
            "tokens": s.tokens, "documents": len(seqs), "max_seq_len": a.max_seq_len,
            "codec": a.codec, "hidden_layers": a.hidden_layers, "writer": a.writer,
            "forward_tokens_per_s": fwd, "capture_tokens_per_s": cap,
            "capture_over_forward": cap / fwd, "forward_in_capture_tokens_per_s": in_capture,
            "bytes_per_token": s.bytes_per_token,
            "stages_s": s.stages}, indent=1))


if __name__ == "__main__":
    main()
