"""Where a training step of AFM-4.5B's 3:1 student spends its GPU time: one layer at a time.

    python bench/bench_afm_layers.py [--tokens 8192] [--docs 2] [--json bench/results/afm_layers.json]

Each row runs one piece of the student as the stage-1 trainer does (float32 master weights
under bf16 autocast, MLP frozen with its weights in bf16, packed documents), forward and
forward + backward on ``--tokens`` tokens in ``--docs`` documents, and reports the time, the
matmul FLOP rate and how much of the GPU time the kernels of each kind take. The whole-layer
rows times 27 (KDA) and 9 (attention) give a step's decoder cost without recomputation.
"""

from __future__ import annotations

import argparse

import torch

from afm import afm_4p5b_config, gpu_name, print_table, synced, write_json
from bench_afm_train import KERNEL_KINDS
from kdpipe.student_train.model.convert import student_config_from_teacher
from kdpipe.student_train.model.layers.packing import SequenceLayout
from kdpipe.student_train.model.modeling import KDAHybridDecoderLayer


def timed(fn, reps: int) -> float:
    fn()
    t0 = synced()
    for _ in range(reps):
        fn()
    return (synced() - t0) / reps


def kinds_of(fn) -> dict[str, float]:
    """GPU milliseconds of one call of ``fn`` by kind of kernel."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA:
            kind = next((k for k, pat in KERNEL_KINDS if re.search(pat, e.key, re.I)), "other")
            out[kind] = out.get(kind, 0.0) + e.self_device_time_total / 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = student_config_from_teacher(afm_4p5b_config(), "3:1")
    cfg.kda_backend = "fla"
    dev = torch.device("cuda")
    n = a.tokens
    cu = torch.linspace(0, n, a.docs + 1, device=dev).round().to(torch.int32)
    layout = SequenceLayout.build(1, n, dev, cu_seqlens=cu)
    layers = {t: KDAHybridDecoderLayer(cfg, cfg.layer_types.index(t)).to(dev)
              for t in ("kda", "full_nope")}
    for layer in layers.values():             # stage 1: MLP frozen, its weights kept in bf16
        for p in layer.mlp.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(torch.bfloat16)
    x0 = torch.randn(1, n, cfg.hidden_size, device=dev)
    kda, attn = layers["kda"], layers["full_nope"]
    def flops(*modules) -> int:                 # matmul FLOPs per token, forward
        return 2 * sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)

    mix = kda.self_attn
    pieces = [
        ("KDA layer (norms + KDA + MLP)", lambda x: kda(x, layout), None),
        ("  input RMSNorm", kda.input_layernorm, None),
        ("  KDA mixer", lambda x: kda.self_attn(x, layout), None),
        ("    projections q,k,v,f,b,g", lambda x: (mix.q_proj(x), mix.k_proj(x), mix.v_proj(x),
                                              mix.f_proj(x), mix.b_proj(x), mix.g_proj(x)),
         flops(mix.q_proj, mix.k_proj, mix.v_proj, mix.f_proj, mix.b_proj, mix.g_proj)),
        ("  MLP (frozen)", kda.mlp, flops(kda.mlp)),
        ("attention layer (norms + SDPA + MLP)", lambda x: attn(x, layout), None),
        ("  attention mixer", lambda x: attn.self_attn(x, layout), None),
    ]
    rows = []
    for name, fn, flops_per_token in pieces:
        def fwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(x0)

        def fwd_bwd():
            x = x0.detach().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward([o.float().sum() for o in outs])

        with torch.no_grad():
            f = timed(fwd, a.reps)
        fb = timed(fwd_bwd, a.reps)
        kinds = kinds_of(fwd_bwd)
        busy = sum(kinds.values())
        row = {"what": name, "tokens": n, "fwd_ms": f * 1e3, "fwd_bwd_ms": fb * 1e3,
               "gpu_busy_ms": busy, **{f"{k}_ms": v for k, v in kinds.items()}}
        if flops_per_token:
            row["fwd_tflops"] = flops_per_token * n / f / 1e12
        rows.append(row)
        print(row, flush=True)
    print(f"\nAFM-4.5B 3:1 student, one layer at a time, {n} tokens in {a.docs} documents, "
          f"{gpu_name()}")
    cols = [("what", "piece", "s"), ("fwd_ms", "fwd ms", ".2f"), ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
            ("gpu_busy_ms", "GPU busy ms", ".2f")]
    cols += [(f"{k}_ms", k.split(" ")[0], ".2f") for k, _ in KERNEL_KINDS + [("other", "")]
             if any(f"{k}_ms" in r for r in rows)]
    print_table("forward / forward + backward", rows, cols)
    write_json(a.json, {"machine": gpu_name(), "tokens": n, "docs": a.docs, "rows": rows})


if __name__ == "__main__":
    main()
