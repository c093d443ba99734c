"""The hybrid model on tiny random configs: packing, cache, generation, save/load, training."""

from __future__ import annotations

import pytest
import torch

import kdpipe.student_train  # noqa: F401  (registers the Auto classes)
from kdpipe.schemas import ConfigError
from kdpipe.student_train import KDAHybridCache, KDAHybridConfig, KDAHybridForCausalLM
from kdpipe.student_train.model.modeling import enable_activation_checkpointing

VOCAB = 97


def tiny_model(layer_types=("kda", "full_rope", "kda", "full_nope"), seed=0, **overrides):
    torch.manual_seed(seed)
    config = KDAHybridConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": len(layer_types), "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "layer_types": list(layer_types), "mlp_gated": False, "hidden_act": "relu2",
        "kda_backend": "torch", **overrides})
    model = KDAHybridForCausalLM(config).eval()
    # fla's init leaves q/k/v small; larger weights make every layer's effect visible in the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight") or "conv1d" in name:
                p.normal_(0, 0.2)
    return model


def tokens(n, seed=1, batch=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_hidden_states_indexing_and_final_norm():
    model = tiny_model()
    x = tokens(12)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        no_head = model(x, return_logits=False)
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(hs[0], model.model.embed_tokens(x))
    torch.testing.assert_close(out.last_hidden_state, model.model.norm(hs[-1]))
    torch.testing.assert_close(out.logits, model.lm_head(out.last_hidden_state))
    assert no_head.logits is None
    torch.testing.assert_close(no_head.last_hidden_state, out.last_hidden_state)
    assert model.get_output_embeddings() is model.lm_head


@pytest.mark.parametrize("how", ["cu_seqlens", "cu_seqlens_cpu", "both", "position_ids"])
def test_packed_documents_do_not_interact(how):
    model = tiny_model()
    docs = [tokens(n, seed=s) for n, s in [(7, 1), (70, 2), (1, 3), (30, 4)]]
    packed = torch.cat(docs, 1)
    lengths = [d.shape[1] for d in docs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = {"cu_seqlens": {"cu_seqlens": cu}, "cu_seqlens_cpu": {"cu_seqlens_cpu": cu},
              "both": {"cu_seqlens": cu, "cu_seqlens_cpu": cu},
              "position_ids": {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
              }[how]
    with torch.no_grad():
        out = model(packed, output_hidden_states=True, **kwargs)
        for i, doc in enumerate(docs):
            alone = model(doc, output_hidden_states=True)
            a, b = int(cu[i]), int(cu[i + 1])
            torch.testing.assert_close(out.logits[:, a:b], alone.logits, rtol=1e-4, atol=1e-4)
            for h_packed, h_alone in zip(out.hidden_states, alone.hidden_states):
                torch.testing.assert_close(h_packed[:, a:b], h_alone, rtol=1e-4, atol=1e-4)


def test_packed_gradients_do_not_cross_documents():
    model = tiny_model().train()
    x = tokens(40)
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    emb = model.model.embed_tokens(x).detach().requires_grad_()
    out = model(inputs_embeds=emb, cu_seqlens=cu)
    out.logits[:, 25:].sum().backward()
    assert emb.grad[:, :25].abs().max() == 0
    assert emb.grad[:, 25:].abs().max() > 0


def test_incremental_decoding_matches_full_forward():
    model = tiny_model()
    x = tokens(40, batch=2)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :21], use_cache=True)
        cache = first.cache
        assert isinstance(cache, KDAHybridCache) and cache.get_seq_length() == 21
        # a multi-token continuation, then single tokens
        steps = [first.logits, model(x[:, 21:30], cache=cache).logits]
        for t in range(30, 40):
            steps.append(model(x[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_types", [("kda", "full_nope", "full_rope"), ("kda", "kda")],
                         ids=["hybrid", "kda-only"])
def test_generate_equals_step_by_step_full_forwards(layer_types):
    model = tiny_model(layer_types)
    prompt = tokens(9, batch=2)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
        seq = prompt
        for _ in range(8):
            next_token = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], 1)
    assert torch.equal(generated, seq)


def test_save_load_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).layer_types == model.config.layer_types
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, KDAHybridForCausalLM)
    x = tokens(33)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_tied_embeddings():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("layers", [0, 1])
def test_activation_checkpointing_gives_the_same_gradients(layers):
    """All layers (0) or some of them recompute in backward: same gradients, and exactly the
    chosen layers run their forward twice."""
    x = tokens(20)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            enable_activation_checkpointing(model, layers)
        count = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i: count.__setitem__(i, count[i] + 1))
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(count)
    n = len(calls[0])
    assert calls[0] == [1] * n
    assert sum(c - 1 for c in calls[1]) == (layers or n)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="the model has"):
        enable_activation_checkpointing(tiny_model(), n + 1)


def test_labels_loss_ignores_document_boundaries():
    model = tiny_model()
    x = tokens(20)
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    with torch.no_grad():
        out = model(x, cu_seqlens=cu, labels=x)
        logp = out.logits.float().log_softmax(-1)
        targets = [(t, x[0, t + 1]) for t in range(19) if t + 1 != 8]
        expected = -torch.stack([logp[0, t, y] for t, y in targets]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_bad_inputs_raise_config_errors():
    model = tiny_model()
    x = tokens(10, batch=2)
    with pytest.raises(ConfigError, match="padding"):
        model(x, attention_mask=torch.tensor([[1] * 10, [0] * 3 + [1] * 7]))
    with pytest.raises(ConfigError, match="batch size 1"):
        model(x, cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(ConfigError, match="from 0 to the row length"):
        model(x[:1], cu_seqlens=torch.tensor([0, 5, 9]))
    with pytest.raises(ConfigError, match="from 0 to the row length"):
        model(x[:1], cu_seqlens_cpu=torch.tensor([0, 5, 9]))
    with pytest.raises(ConfigError, match="strictly increasing"):
        model(x[:1], cu_seqlens_cpu=torch.tensor([0, 5, 5, 10]))
    with pytest.raises(ConfigError, match="use_cache"):
        model(x[:1], cu_seqlens=torch.tensor([0, 5, 10]), use_cache=True)


def test_cpu_run_never_imports_fla():
    import subprocess
    import sys
    code = ("import sys, torch, student_train\n"
            "from kdpipe.student_train import KDAHybridConfig, KDAHybridForCausalLM\n"
            "m = KDAHybridForCausalLM(KDAHybridConfig(vocab_size=50, hidden_size=32,"
            " intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,"
            " layer_types=['kda', 'full_nope']))\n"
            "x = torch.randint(0, 50, (1, 70))\n"
            "m(x, labels=x).loss.backward()\n"
            "assert not [n for n in sys.modules if n.split('.')[0] == 'fla'], 'fla imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fla_backend_needs_cuda():
    model = tiny_model(kda_backend="fla")
    with pytest.raises(ConfigError, match="needs CUDA"):
        model(tokens(5))


@pytest.mark.parametrize("autocast", [False, True])
def test_relu_squared_matches_transformers_relu2_bitwise(autocast):
    """The MLP's relu^2 stays in the input dtype under bf16 autocast, with the values and
    gradients of transformers' relu2 (whose square autocast may run in float32)."""
    from transformers.activations import ACT2FN

    from kdpipe.student_train.model.layers.mlp import ReLUSquared
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if autocast else torch.float32
    u0 = (torch.randn(64, 96, generator=g) * 3).to(dtype)
    w = torch.randn(16, 96, generator=g)
    results = []
    for act in (ACT2FN["relu2"], ReLUSquared()):
        u = u0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a = act(u)
            y = torch.nn.functional.linear(a, w)              # the down projection
        y.float().square().sum().backward()
        results.append((a.dtype, y, u.grad))
    assert results[1][0] == dtype
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])


def test_attention_per_document_equals_the_block_diagonal_mask(monkeypatch):
    """Packed rows attend once per document; rows of too many documents use the dense
    block-diagonal causal mask: both give the same output, with grouped KV heads."""
    from kdpipe.student_train.model.layers import attention
    from kdpipe.student_train.model.layers.packing import SequenceLayout
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 23, 8, generator=g)
    k, v = (torch.randn(1, 2, 23, 8, generator=g) for _ in range(2))
    layout = SequenceLayout.build(1, 23, torch.device("cpu"), cu_seqlens=[0, 5, 6, 17, 23])
    per_doc = attention.attend(q, k, v, layout, scale=0.3)
    monkeypatch.setattr(attention, "PER_DOCUMENT_MAX_DOCS", 3)
    masked = attention.attend(q, k, v, layout, scale=0.3)
    torch.testing.assert_close(per_doc, masked, rtol=1e-5, atol=1e-6)
    alone = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, 6:17], k[:, :, 6:17], v[:, :, 6:17], is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(per_doc[:, :, 6:17], alone, rtol=1e-5, atol=1e-6)
