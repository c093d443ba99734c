"""fla's kernels against the PyTorch implementation on the same weights and inputs (CUDA only).

Head dims are the ones real students use (64: SmolLM2, 128: AFM); fla's autotuning of an odd
head dim (100) did not finish within minutes on an H100, so odd sizes are exercised through the
sequence lengths instead. Tolerances are fla's own for its kernels against its naive reference, as relative RMS error:
5e-3 for outputs and states, 8e-3 for q/k/v/state gradients, 2e-2 for the gate and beta
inputs. The reference runs in float32 on the same (half-precision) input values.
"""

from __future__ import annotations

import pytest
import torch

from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM
from kdpipe.student_train.model.layers.kda import KimiDeltaAttention
from kdpipe.student_train.model.layers.packing import SequenceLayout
from kdpipe.student_train.model.ops import kda_fla, kda_torch

pytestmark = pytest.mark.gpu

# bf16 is the training dtype; fp16 matched too when last run on an H100 (see README)
DTYPES = [torch.bfloat16]


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    return ((ref - got).pow(2).mean().sqrt() / (ref.pow(2).mean().sqrt() + 1e-12)).item()


def check(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    err = rel_rms(ref, got)
    assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


def kda_inputs(T, H, D, N, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dt)

    inputs = {"q": rand(1, T, H, D), "k": rand(1, T, H, D), "v": rand(1, T, H, D),
              "g": rand(1, T, H, D), "beta": rand(1, T, H),
              "A_log": torch.empty(H, device="cuda").uniform_(1, 16, generator=gen).log(),
              "dt_bias": rand(H * D, dt=torch.float32) * 0.5,
              "initial_state": rand(N, H, D, D, dt=torch.float32) * 0.1}
    return {k: v.requires_grad_() for k, v in inputs.items()}


def run_kda(ops, inputs, cu, recurrent=False, upcast=False):
    x = {k: (v.float() if upcast else v) for k, v in inputs.items()}
    return ops.kda(x["q"], x["k"], x["v"], x["g"], x["beta"], x["A_log"], x["dt_bias"],
                   initial_state=x["initial_state"], output_final_state=True, cu_seqlens=cu,
                   recurrent=recurrent)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D,bounds", [
    (4, 64, [0, 1024]), (4, 128, [0, 256, 500, 1000]), (2, 64, [0, 15, 100, 300, 1200, 2000])],
    ids=lambda x: str(x))
def test_chunk_kernel_matches_torch_forward_and_backward(H, D, bounds, dtype):
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    inputs = kda_inputs(bounds[-1], H, D, len(bounds) - 1, dtype)
    do = torch.randn_like(inputs["v"], dtype=torch.float32)
    dht = torch.randn_like(inputs["initial_state"])
    results = []
    for ops, upcast in ((kda_torch, True), (kda_fla, False)):
        o, ht = run_kda(ops, inputs, cu, upcast=upcast)
        ((o.float() * do).sum() + (ht * dht).sum()).backward()
        results.append((o, ht, {k: v.grad.clone() for k, v in inputs.items()}))
        for v in inputs.values():
            v.grad = None
    (o_ref, ht_ref, g_ref), (o, ht, g) = results
    check("o", o_ref, o, 5e-3)
    check("ht", ht_ref, ht, 5e-3)
    # dA_log and ddt_bias sum bf16 terms over every token (A_log has one value a head): their
    # error follows the accumulation order of the kernel configuration autotuning picked
    for name, tol in (("q", 8e-3), ("k", 8e-3), ("v", 8e-3), ("initial_state", 8e-3),
                      ("g", 2e-2), ("beta", 2e-2), ("A_log", 3e-2), ("dt_bias", 3e-2)):
        check(f"d{name}", g_ref[name], g[name], tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recurrent_kernel_matches_torch_for_decoding(dtype):
    with torch.no_grad():
        cu = torch.arange(5, dtype=torch.int32, device="cuda")     # 4 sequences, 1 token each
        inputs = kda_inputs(4, 4, 128, 4, dtype)
        o_ref, ht_ref = run_kda(kda_torch, inputs, cu, recurrent=True, upcast=True)
        o, ht = run_kda(kda_fla, inputs, cu, recurrent=True)
    check("o", o_ref, o, 5e-3)
    check("ht", ht_ref, ht, 5e-3)


def test_short_conv_kernel_matches_torch():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 300, 256, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(256, 1, 4, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    w.requires_grad_()
    cache = torch.randn(3, 256, 4, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, 2, 120, 300], dtype=torch.int32, device="cuda")
    outs = []
    for ops in (kda_torch, kda_fla):
        y, state = ops.short_conv(x, w, cache=cache.clone(), output_final_state=True, cu_seqlens=cu)
        y.float().pow(2).sum().backward()
        outs.append((y, state, x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    (y_ref, s_ref, dx_ref, dw_ref), (y, s, dx, dw) = outs
    check("y", y_ref, y, 5e-3)
    check("state", s_ref, s, 1e-6)
    check("dx", dx_ref, dx, 8e-3)
    check("dw", dw_ref, dw, 8e-3)


def to_bf16(module: torch.nn.Module) -> torch.nn.Module:
    """Cast to bfloat16 but keep A_log and dt_bias in float32, as loading a checkpoint does."""
    module.cuda().to(torch.bfloat16)
    for m in module.modules():
        if isinstance(m, KimiDeltaAttention):
            m.A_log.data, m.dt_bias.data = m.A_log.data.float(), m.dt_bias.data.float()
    return module


def test_kda_layer_fla_matches_torch_on_packed_batch():
    torch.manual_seed(0)
    layers = {backend: to_bf16(KimiDeltaAttention(512, 4, 128, backend=backend))
              for backend in ("torch", "fla")}
    layers["fla"].load_state_dict(layers["torch"].state_dict())
    bounds = [0, 100, 900, 1500]
    layout = SequenceLayout.build(1, bounds[-1], torch.device("cuda"),
                                  cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    x = torch.randn(1, bounds[-1], 512, device="cuda", dtype=torch.bfloat16)
    results = {}
    for backend, layer in layers.items():
        out = layer(x, layout)
        out.float().pow(2).mean().backward()
        results[backend] = (out, {n: p.grad for n, p in layer.named_parameters()})
    check("output", results["torch"][0], results["fla"][0], 1e-2)
    for name, grad in results["torch"][1].items():
        check(f"grad {name}", grad, results["fla"][1][name], 2e-2)


def tiny_cuda_model():
    torch.manual_seed(0)
    config = KDAHybridConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, layer_types=["kda", "full_nope", "kda", "full_rope"])
    return to_bf16(KDAHybridForCausalLM(config)).eval()


def test_model_packed_rows_match_separate_documents_on_cuda():
    model = tiny_cuda_model()
    lengths = [37, 300, 5, 170]
    docs = [torch.randint(0, 256, (1, n), device="cuda") for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), cu_seqlens=cu, output_hidden_states=True)
        for i, doc in enumerate(docs):
            alone = model(doc, output_hidden_states=True, use_cache=False)
            a, b = int(cu[i]), int(cu[i + 1])
            check(f"doc {i} last hidden", alone.hidden_states[-1],
                  packed.hidden_states[-1][:, a:b], 2e-2)


def test_incremental_decoding_matches_full_forward_on_cuda():
    model = tiny_cuda_model()
    x = torch.randint(0, 256, (2, 80), device="cuda")
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        first = model(x[:, :70], use_cache=True)
        steps = [first.logits]
        for t in range(70, 80):
            steps.append(model(x[:, t:t + 1], cache=first.cache).logits)
    check("logits", full, torch.cat(steps, 1), 2e-2)
