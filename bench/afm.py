"""What the AFM-4.5B benchmarks share: a random-weight teacher, long documents, FLOP counts,
the GPU's measured bf16 matmul rate, and the table/JSON output.

Random weights are fine for speed (every FLOP and byte is the same as with AFM's real ones);
the top-k distributions are flatter than a trained model's, so bytes/token here say nothing
about compression on real data.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

# arcee-ai/AFM-4.5B-Base's architecture (its config.json): the teacher kdpipe is sized for.
# Used to count parameters and to benchmark with random weights where the hub is out of reach.
AFM_4P5B = dict(
    vocab_size=128004, hidden_size=2560, intermediate_size=18432, num_hidden_layers=36,
    num_attention_heads=20, num_key_value_heads=4, head_dim=128, hidden_act="relu2",
    max_position_embeddings=65536, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 20.0,
                     "original_max_position_embeddings": 4096},
    bos_token_id=128000, eos_token_id=128001, dtype="bfloat16", architectures=["ArceeForCausalLM"])


def afm_4p5b_config():
    """An ``ArceeConfig`` of AFM-4.5B (``ArceeConfig()``'s defaults are a different model)."""
    from transformers import ArceeConfig
    return ArceeConfig(**AFM_4P5B)


def random_afm_teacher(out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """AFM-4.5B with random bf16 weights, built on the GPU and saved with a tokenizer, so that
    capture and training load it as they load any checkpoint."""
    return random_teacher(out, tokenizer_dir, afm_4p5b_config(), device="cuda",
                          dtype=torch.bfloat16, seed=seed)


def tiny_config(vocab_size: int):
    """AFM's architecture at a size a CPU runs in milliseconds a batch (smoke runs)."""
    from transformers import ArceeConfig
    return ArceeConfig(**(AFM_4P5B | dict(vocab_size=vocab_size, hidden_size=64,
                                          intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, bos_token_id=0, eos_token_id=0,
                                          dtype="float32")))


def random_teacher(out: Path, tokenizer_dir: Path, config, *, device: str, dtype: torch.dtype,
                   seed: int = 0) -> Path:
    """A model of ``config`` with random weights, saved with a tokenizer (kept if ``out``
    already holds one)."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tmp.rename(out)
    return out


def long_documents(out: Path, tokenizer_dir: Path, *, n_docs: int, min_tokens: int) -> Path:
    """JSONL of ``n_docs`` documents of at least ``min_tokens`` tokens, each joined from
    consecutive records of the embedded corpus (stdlib docstrings, built on this machine)."""
    from transformers import AutoTokenizer

    from kdpipe.capture.corpus import build_corpus

    corpus = out.with_suffix(".corpus.jsonl")
    build_corpus(corpus, out.with_suffix(".heldout.jsonl"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [r["text"] for r in map(json.loads, corpus.read_text().splitlines()) if "text" in r]
    docs, cur, i = [], [], 0
    while len(docs) < n_docs:
        cur.append(texts[i % len(texts)])
        i += 1
        if len(cur) % 8 == 0 and len(tok("\n\n".join(cur))["input_ids"]) >= min_tokens:
            docs.append("\n\n".join(cur))
            cur = []
    out.write_text("".join(json.dumps({"id": f"long-{j}", "text": t}) + "\n"
                           for j, t in enumerate(docs)))
    return out


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """The GPU's bf16 dense matmul rate, measured now: the denominator of MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def linear_params(model: torch.nn.Module) -> int:
    """Weights that take part in matmuls (every nn.Linear, the LM head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(config, seq_len: int, full_layers: int) -> float:
    """Causal softmax attention, QK^T and PV, averaged over the positions of one sequence."""
    width = config.num_attention_heads * config.head_dim
    return 4 * full_layers * width * (seq_len + 1) / 2


H200_BF16_PEAK = 989e12   # dense bf16 FLOP/s of an H200 (NVIDIA's data sheet): the MFU denominator


def train_flops_per_token(model: torch.nn.Module, config, seq_len: int, full_layers: int) -> float:
    """Model FLOPs of one trained token, written down: forward ``2 P + A`` (P the weights of
    every nn.Linear, LM head included; A causal attention in documents of ``seq_len`` tokens),
    backward ``2 P + 2 A`` for the input gradients (every layer has trainable parameters below
    it in both recipes) plus ``2 P_trainable`` for the weight gradients. Recomputed forwards and
    fla's KDA kernels are not counted, so MFU is a lower bound."""
    p = linear_params(model)
    trainable = sum(m.weight.numel() for m in model.modules()
                    if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
    a = attention_flops_per_token(config, seq_len, full_layers)
    return (2 * p + a) + (2 * p + 2 * a) + 2 * trainable


def spread(values: list[float]) -> dict:
    """Median and range of a row's repeats (the table shows these; the JSON keeps them all)."""
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"median": median, "min": ordered[0], "max": ordered[-1]}


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def print_table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """``cols``: (key, header, format)."""
    print(f"\n{title}")
    first = max([40] + [len(str(r.get(cols[0][0], ""))) for r in rows])
    widths = [first] + [max(len(h), 10) for _, h, _ in cols[1:]]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, h, _), w)
                    in enumerate(zip(cols, widths))))
    for r in rows:
        cells = []
        for i, ((key, _, fmt), w) in enumerate(zip(cols, widths)):
            v = r.get(key)
            text = "-" if v is None else format(v, fmt)
            cells.append(text.rjust(w) if i else text.ljust(w))
        print("  ".join(cells))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


def gpu_name() -> str:
    return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
