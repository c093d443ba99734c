"""Time one KDA layer forward + backward on CUDA: fla's kernels against the PyTorch path.

    python bench/bench_kda.py --out runs/bench_kda.json
    python bench/bench_kda.py --hidden 2560 --heads 20 --seq-lens 2048,8192 --out bench.json

Same layer, same weights, same input for both backends (bf16 activations and weights, float32
A_log/dt_bias, as a loaded checkpoint has them). Each measurement is the median of ``--iters``
timed steps after ``--warmup`` steps, timed with CUDA events. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from kdpipe.student_train.model.layers.kda import KimiDeltaAttention
from kdpipe.student_train.model.layers.packing import SequenceLayout

BACKENDS = ("fla", "torch")


def build_layer(hidden: int, heads: int, backend: str, dtype: torch.dtype) -> KimiDeltaAttention:
    torch.manual_seed(0)
    layer = KimiDeltaAttention(hidden, heads, hidden // heads, backend=backend).cuda().to(dtype)
    layer.A_log.data, layer.dt_bias.data = layer.A_log.data.float(), layer.dt_bias.data.float()
    return layer


def time_step(layer: KimiDeltaAttention, x: torch.Tensor, layout: SequenceLayout,
              warmup: int, iters: int) -> dict:
    def step() -> None:
        out = layer(x, layout)
        out.backward(torch.ones_like(out))
        layer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {"ms": ms, "ms_min": min(times), "tokens_per_s": x.shape[0] * x.shape[1] / ms * 1e3,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file for the results")
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--seq-lens", default="2048,8192", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kda needs a CUDA GPU (fla's kernels run on CUDA only)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    backends = [b for b in args.backends.split(",") if b]
    results = []
    for seq_len in (int(t) for t in args.seq_lens.split(",")):
        x = torch.randn(args.batch, seq_len, args.hidden, device="cuda", dtype=dtype,
                        requires_grad=True)
        layout = SequenceLayout.build(args.batch, seq_len, x.device)
        for backend in backends:
            row = {"seq_len": seq_len, "batch": args.batch, "backend": backend}
            try:
                row.update(time_step(build_layer(args.hidden, args.heads, backend, dtype), x,
                                     layout, args.warmup, args.iters))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            torch.cuda.empty_cache()
            results.append(row)

    print(f"KDA layer fwd+bwd, hidden {args.hidden}, {args.heads} heads, {args.dtype}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'T':>7} {'backend':>8} {'ms':>10} {'tokens/s':>12} {'peak GiB':>9} {'vs fla':>7}")
    for row in results:
        if "error" in row:
            print(f"{row['seq_len']:>7} {row['backend']:>8} {row['error']:>10}")
            continue
        fla = next((r for r in results if r["seq_len"] == row["seq_len"]
                    and r["backend"] == "fla" and "ms" in r), None)
        ratio = f"{row['ms'] / fla['ms']:.1f}x" if fla else "-"
        print(f"{row['seq_len']:>7} {row['backend']:>8} {row['ms']:>10.2f} "
              f"{row['tokens_per_s']:>12,.0f} {row['peak_mem_gib']:>9.2f} {ratio:>7}")

    report = {"device": torch.cuda.get_device_name(), "hidden": args.hidden, "heads": args.heads,
              "head_dim": args.hidden // args.heads, "dtype": args.dtype,
              "warmup": args.warmup, "iters": args.iters,
              "versions": {"torch": torch.__version__, "fla-core": package_version("fla-core"),
                           "triton": package_version("triton"),
                           "python": platform.python_version()},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
