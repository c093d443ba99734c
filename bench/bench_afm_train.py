"""Training throughput of AFM-4.5B's 3:1 KDA hybrid student: recipes, lengths, online vs offline.

    python bench/bench_afm_train.py --teacher DIR --data DS [--rows stage1:8192:none,...]
        [--online 8192] [--steps 20] [--repeats 3] [--warmup 4] [--json bench/results/X.json]
    torchrun --nproc-per-node 2 bench/bench_afm_train.py ... [--strategy ddp|fsdp]
        (several GPUs: DDP replicas or FSDP2 shards; rank 0 reports)

``--teacher``: AFM-4.5B with random weights (``bench/afm.py``); ``--data``: a capture of it
with hidden layers 9,18,27,36 (``bench_afm_capture.py --keep DS``). Each row builds kdpipe's
``Trainer`` (the code ``kdpipe train`` runs: streaming shards, decoding on the GPU, packing,
bf16 autocast over float32 master weights, activation checkpointing, chunked sparse KL,
compiled decoder layers), runs ``--warmup`` untimed steps (``Trainer.one_step``), then
``--repeats`` times ``--steps`` timed ones in the same process: the table shows the median
and range of the repeats' tokens/s, the JSON keeps every repeat. MFU divides the FLOPs of a
trained token (``afm.train_flops_per_token``, written down there) by the H200's dense bf16
peak. The student is the 3:1 hybrid with random
weights rounded to bf16 (as converted from a bf16 teacher, so frozen linears are kept in bf16),
built once on the GPU and handed to every row's ``Trainer`` (conversion from random teacher
weights would only cost time); under FSDP2, which shards a model's parameters in place, each
row builds its own. A step is ``max(1, 8192 / L)`` sequences of L tokens per GPU.

A row is ``recipe:L[:C[:K]]``, C the activation checkpointing: ``all`` layers recompute in
backward (the default), ``none``, or a number of layers; K the compilation (``train.compile``):
``layers`` (the default) or ``none`` (eager).

Recipes: ``stage1`` (embeddings, LM head, norms and MLPs frozen; 0.2 CE + 0.2 KL at T=2 +
0.6 hidden cosine on layers 9/18/27/36) and ``full`` (every parameter, same loss). ``online``
runs the stage-1 step with the teacher's forward (top-k and hidden states computed from the
packed batch inside the step, instead of read from shards) at the ``--online`` length and
checkpointing (``L[:C]``), against the offline row of the same length and checkpointing; the
teacher produces the step's targets, so its forward counts as the step's data wait.

A last table compares the head loss computed in chunks of ``--loss-chunk`` positions against
materializing the logits of all positions at once: forward + backward time and peak memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

from afm import (H200_BF16_PEAK, afm_4p5b_config, gpu_name, print_table, spread, synced,
                 train_flops_per_token, write_json)
from kdpipe.capture.topk import topk_logprobs
from kdpipe.student_train import KDAHybridForCausalLM
from kdpipe.student_train.model.convert import student_config_from_teacher
from kdpipe.student_train.sparse_kl import HeadTerm, head_losses
from kdpipe.schemas.convert import from_data
from kdpipe.student_train.train_config import Config
from kdpipe.student_train.trainer import Trainer

LAYERS = [9, 18, 27, 36]
FROZEN = ["embed_tokens", "lm_head", r"(^|\.)(input_layernorm|post_attention_layernorm|norm)"
          r"\.weight$", r"^model\.layers\.\d+\.mlp\."]


def config(out: str, data: str, student_dir: str, recipe: str, seq_len: int,
           recompute: str, compiled: str, strategy: str = "auto") -> Config:
    return from_data(Config, {
        "out": out, "student": {"path": student_dir},
        "data": {"path": data, "seq_len": seq_len, "workers": 2, "decode_on": "device",
                 "check_tokenizer": False},
        "loss": {"terms": [{"kind": "ce", "weight": 0.2},
                           {"kind": "kl", "weight": 0.2, "temperature": 2.0},
                           {"kind": "hidden_cosine", "weight": 0.6}],
                 "missing": "tail", "chunk_size": 2048,
                 "layer_map": [[s, s] for s in LAYERS]},
        "optim": {"lr": 1e-5, "max_grad_norm": 1.0},
        "train": {"max_steps": 1000, "micro_batch": max(1, 8192 // seq_len), "grad_accum": 1,
                  "precision": "bf16", "gradient_checkpointing": recompute != "none",
                  "checkpoint_layers": 0 if recompute in ("all", "none") else int(recompute),
                  "compile": compiled,
                  "frozen": FROZEN if recipe != "full" else []},
        "parallel": {"strategy": strategy},
        "log": {"tensorboard": False, "progress": False}}).validate()


def student_config():
    cfg = student_config_from_teacher(afm_4p5b_config(), "3:1")
    cfg.kda_backend = "fla"
    return cfg


def sharded(args) -> bool:
    """Whether rows may run under FSDP2 (several processes, ``auto`` may choose it), which
    shards a student's parameters in place: each row then builds its own."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.strategy != "ddp"


def make_student() -> KDAHybridForCausalLM:
    """The 3:1 hybrid with random weights rounded to bf16, as converted from a bf16 teacher."""
    with torch.device("cuda"):
        student = KDAHybridForCausalLM(student_config())
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(p.bfloat16().float())
    return student


class OnlineTeacher:
    """The teacher inside the step: top-k and hidden states of each packed micro-batch."""

    def __init__(self, path: str, top_k: int) -> None:
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        self.model.eval()
        self.top_k, self.kept = top_k, {}
        for layer in LAYERS:
            self.model.model.layers[layer - 1].register_forward_hook(self._keep(layer))

    def _keep(self, layer: int):
        def hook(_m, _i, out):
            self.kept[layer] = (out[0] if isinstance(out, tuple) else out)[0]
        return hook

    @torch.no_grad()     # not inference_mode: the loss saves these targets for backward
    def targets(self, batch):
        """The batch with the teacher's targets (the packed row runs as one sequence: same
        FLOPs as per-document attention up to the attention term)."""
        batch = batch.to("cuda")
        h = self.model.model(input_ids=batch.input_ids).last_hidden_state[0][batch.row_pos]
        head = self.model.get_output_embeddings()
        parts = [topk_logprobs(head(h[s:s + 2048]), self.top_k) for s in range(0, len(h), 2048)]
        ids = torch.cat([p[0] for p in parts])
        lps = torch.cat([p[1] for p in parts])
        batch.topk_ids, batch.topk_logprobs = ids, lps
        batch.tail = (1 - lps.double().exp().sum(-1)).clamp(min=0).float()
        batch.hidden = {layer: t.float() for layer, t in self.kept.items()}
        return batch


class WithTargets:
    """A trainer's data with the online teacher's targets added to every micro-batch."""

    def __init__(self, batches, teacher: OnlineTeacher) -> None:
        self.inner, self.teacher = batches, teacher

    def next_step(self, prefetch_next: bool = False):
        batches, state = self.inner.next_step(prefetch_next=prefetch_next)
        return [self.teacher.targets(b) for b in batches], state

    @property
    def state(self):
        return self.inner.state

    def close(self) -> None:
        self.inner.close()


def run_row(recipe: str, seq_len: int, recompute: str, compiled: str, *, student, args,
            teacher=None) -> dict:
    if sharded(args):
        student = make_student()
    for p in student.parameters():              # a row before may have frozen and packed them
        p.data = p.data.float()
        p.requires_grad_(True)
    student.model.gradient_checkpointing = False     # or enabled it: the Trainer decides
    for layer in student.model.layers:               # or compiled them in place: likewise
        layer._compiled_call_impl = None
    out = f"/tmp/kdpipe-afm-train/{recipe}-{seq_len}{'-online' if teacher else ''}"  # all ranks
    torch.cuda.reset_peak_memory_stats()
    tr = Trainer(config(out, args.data, args.student_dir, recipe, seq_len, recompute, compiled,
                        args.strategy), overwrite=True, student=student)
    if teacher is not None:
        tr.batches = WithTargets(tr.batches, teacher)
    warm = [tr.one_step() for _ in range(args.warmup)]
    repeats = []
    for _ in range(args.repeats):
        records = [tr.one_step() for _ in range(args.steps)]
        times = [r["tokens"] / r["tokens_per_s"] for r in records]     # the steps' wall seconds
        tokens = sum(r["tokens"] for r in records)
        repeats.append({
            "steps": len(records), "tokens": tokens, "seconds": sum(times),
            "tokens_per_s": tokens / sum(times),
            **{f"{k}_s": sum(r["stage_s"][k] for r in records) / len(records)
               for k in ("data_wait", "forward_backward", "optimizer")}})
    profile = profile_step(tr) if args.profile else None
    tr.batches.close()
    world = tr.dist.world_size
    rate = spread([r["tokens_per_s"] for r in repeats])
    per_token = train_flops_per_token(student, student.config, min(seq_len, args.doc_len),
                                      student.config.layer_types.count("full_nope")
                                      + student.config.layer_types.count("full_rope"))
    row = {"what": f"{recipe}{' online' if teacher else ''} L={seq_len} recompute={recompute}"
                   f"{' eager' if compiled == 'none' else ''}",
           "recipe": recipe, "online": teacher is not None, "seq_len": seq_len,
           "recompute": recompute, "compile": compiled, "gpus": world,
           "strategy": tr.strategy,
           "trainable_b": tr.trainable / 1e9,
           "tokens_per_s": rate["median"], "tokens_per_s_min": rate["min"],
           "tokens_per_s_max": rate["max"], "tokens_per_s_per_gpu": rate["median"] / world,
           "flops_per_token": per_token,
           "mfu": rate["median"] / world * per_token / H200_BF16_PEAK,
           "step_s": spread([r["seconds"] / r["steps"] for r in repeats])["median"],
           **{k: spread([r[k] for r in repeats])["median"]
              for k in ("data_wait_s", "forward_backward_s", "optimizer_s")},
           "warmup_s": sum(r["tokens"] / r["tokens_per_s"] for r in warm),
           "loss": records[-1]["loss"], "repeats": repeats, "profile": profile,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del tr
    gc.collect()
    torch.cuda.empty_cache()
    return row


# GPU kernels by what they do (first match wins), for the profile summary
KERNEL_KINDS = [("attention (SDPA)", r"flash|fmha|attention|sdpa"),
                ("matmul", r"nvjet|gemm|cutlass|xmma|sm90_|ampere_"),
                ("KDA and conv (fla)", r"kda|chunk|fused_recurrent|conv|wy_|solve_tril|kkt"),
                ("copies and casts", r"copy|cast|convert"),
                ("reductions", r"reduce|norm|softmax|sum|max"),
                ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
                ("optimizer", r"adam|foreach|multi_tensor")]


# host-side calls that wait for the device (the GPU idles after them while the host catches up)
HOST_WAITS = r"Synchronize|_local_scalar_dense|^cudaMemcpy$|cudaMemcpyAsync|nonzero"


def profile_step(tr, rows: int = 12) -> dict:
    """One more step under torch.profiler: GPU busy time against the step's wall time, by kind
    of kernel, and the kernels that take the most time; on the host, the ops with the most
    self time, the waits for the device, and the kernel launches."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    t0 = synced()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tr.train_step(tr.batches.next_step(prefetch_next=True)[0])
        torch.cuda.synchronize()
    wall = synced() - t0
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = next((k for k, pat in KERNEL_KINDS if re.search(pat, e.key, re.I)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    host = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    host_top = sorted(host, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    waits = [e for e in host if re.search(HOST_WAITS, e.key)]
    launches = [e for e in host if re.search(r"LaunchKernel|cuLaunch", e.key)]
    return {"wall_s": wall, "gpu_busy_s": busy,
            "host_ops": [{"op": e.key[:90], "ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                         for e in host_top],
            "host_waits": [{"op": e.key[:90], "ms": e.self_cpu_time_total / 1e3,
                            "calls": e.count} for e in waits],
            "launches": sum(e.count for e in launches),
            "launch_ms": sum(e.self_cpu_time_total for e in launches) / 1e3,
            "by_kind": [{"kind": k, "ms": v * 1e3, "share_of_busy": v / busy}
                        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])],
            "top_kernels": [{"kernel": e.key[:90], "ms": e.self_device_time_total / 1e3,
                             "calls": e.count} for e in top]}


def loss_memory(n: int, chunk: int, top_k: int = 128) -> list[dict]:
    """Head loss forward + backward over n positions: chunked vs all logits at once."""
    cfg = afm_4p5b_config()
    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(n, cfg.hidden_size, device="cuda", generator=g)
    w = (torch.randn(cfg.vocab_size, cfg.hidden_size, device="cuda", generator=g) * 0.02)
    w.requires_grad_(True)
    ids = torch.randint(0, cfg.vocab_size, (n, top_k), device="cuda", generator=g)
    lps = torch.log_softmax(torch.randn(n, top_k, device="cuda", generator=g), -1) - 0.1
    tail = (1 - lps.exp().sum(-1)).clamp(min=0)
    labels = torch.randint(0, cfg.vocab_size, (n,), device="cuda", generator=g)
    terms = [HeadTerm("ce", "ce"), HeadTerm("kl_t2", "kl", 2.0, "tail")]
    rows = []
    for name, size in ((f"chunked ({chunk} positions)", chunk), ("all logits at once", 0)):
        for rep in range(3):
            h = h0.clone().requires_grad_(True)
            w.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = synced()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                sums = head_losses(h, w, topk_ids=ids, topk_logprobs=lps, tail=tail,
                                   has_teacher=torch.ones(n, dtype=torch.bool, device="cuda"),
                                   labels=labels, terms=terms, chunk_size=size)
            sum(sums.values()).backward()
            dt = synced() - t0
        rows.append({"what": name, "positions": n, "ms": dt * 1e3,
                     "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", default="stage1:2048,stage1:8192,stage1:8192:none,stage1:32768,"
                                      "full:8192,full:8192:none,full:32768")
    ap.add_argument("--online", default="8192", help="L[:C] of the online row (0: none)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per row, in one process")
    ap.add_argument("--warmup", type=int, default=4,
                    help="untimed steps first (compilation, autotuning, the first recompile)")
    ap.add_argument("--loss-positions", type=int, default=8192, help="0: no loss table")
    ap.add_argument("--loss-chunk", type=int, default=2048)
    ap.add_argument("--doc-len", type=int, default=4096,
                    help="the documents' length in DS (attention never crosses documents)")
    ap.add_argument("--profile", action="store_true", help="profile one more step per row")
    ap.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                    help="several GPUs (torchrun): DDP replicas or FSDP2 shards")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)

    # one student for every row (FSDP2: one per row), float32 master copy on the GPU
    student = None if sharded(args) else make_student()
    args.student_dir = tempfile.mkdtemp(prefix="afm-student-")
    student_config().save_pretrained(args.student_dir)   # the config the Trainer checks against
    rows = []
    meta = {"machine": gpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "peak_flops": H200_BF16_PEAK}
    for spec in [r for r in args.rows.split(",") if r]:
        recipe, length, *rest = spec.split(":")
        recompute = rest[0] if rest else "all"
        compiled = rest[1] if len(rest) > 1 else "layers"
        try:
            rows.append(run_row(recipe, int(length), recompute, compiled, student=student,
                                args=args))
        except torch.OutOfMemoryError as e:
            rows.append({"what": f"{recipe} L={length} recompute={recompute}",
                         "error": f"out of memory: {e}"[:200]})
            gc.collect()
            torch.cuda.empty_cache()
        if rank == 0:
            print(rows[-1], flush=True)
            write_json(args.json, {**meta, "rows": rows, "partial": True})
    if args.online != "0":
        length, recompute = (args.online.split(":") + ["all"])[:2]
        offline = next((r for r in rows if r.get("recipe") == "stage1" and r["seq_len"] ==
                        int(length) and r["recompute"] == recompute
                        and r["compile"] == "layers"), None)
        teacher = OnlineTeacher(args.teacher, top_k=128)
        online = run_row("stage1", int(length), recompute, "layers", student=student, args=args,
                         teacher=teacher)
        if offline:
            online["offline_speedup"] = offline["tokens_per_s"] / online["tokens_per_s"]
        rows.append(online)
        del teacher
        gc.collect()
        torch.cuda.empty_cache()
    del student
    gc.collect()
    torch.cuda.empty_cache()
    loss_rows = loss_memory(args.loss_positions, args.loss_chunk) if args.loss_positions else []
    if rank != 0:
        return
    print(f"\nAFM-4.5B 3:1 KDA hybrid student (random weights), {gpu_name()}, "
          f"{rows[0].get('gpus', 1)} process(es); median of {args.repeats} repeats of "
          f"{args.steps} timed steps after {args.warmup} untimed; MFU against "
          f"{H200_BF16_PEAK / 1e12:.0f} TFLOP/s")
    print_table("training throughput", rows, [
        ("what", "what", "s"), ("strategy", "parallel", "s"), ("tokens_per_s", "tokens/s", ".0f"),
        ("tokens_per_s_min", "min", ".0f"), ("tokens_per_s_max", "max", ".0f"),
        ("tokens_per_s_per_gpu", "per GPU", ".0f"), ("mfu", "MFU", ".1%"),
        ("step_s", "s/step", ".3f"),
        ("data_wait_s", "data wait s", ".3f"), ("forward_backward_s", "fwd+bwd s", ".3f"),
        ("optimizer_s", "optim s", ".3f"),
        ("trainable_b", "trainable B", ".2f"), ("peak_gib", "peak GiB", ".1f"),
        ("offline_speedup", "offline x", ".2f")])
    for r in rows:
        if r.get("profile"):
            p = r["profile"]
            print_table(f"one step of {r['what']}: {p['wall_s']:.3f} s, GPU busy "
                        f"{p['gpu_busy_s']:.3f} s", p["by_kind"], [
                            ("kind", "kernels", "s"), ("ms", "ms", ".1f"),
                            ("share_of_busy", "share", ".1%")])
            print_table("top kernels", p["top_kernels"], [
                ("kernel", "kernel", "s"), ("ms", "ms", ".1f"), ("calls", "calls", "d")])
            print_table(f"host: {p['launches']} kernel launches ({p['launch_ms']:.1f} ms); "
                        f"ops by self time", p["host_ops"], [
                            ("op", "op", "s"), ("ms", "ms", ".1f"), ("calls", "calls", "d")])
            print_table("host: waits for the device", p["host_waits"], [
                ("op", "op", "s"), ("ms", "ms", ".1f"), ("calls", "calls", "d")])
    if loss_rows:
        print_table("head loss, forward + backward", loss_rows, [
            ("what", "what", "s"), ("positions", "positions", "d"), ("ms", "ms", ".1f"),
            ("peak_extra_gib", "peak GiB", ".2f")])
    write_json(args.json, {**meta, "rows": rows, "loss": loss_rows})


if __name__ == "__main__":
    main()
