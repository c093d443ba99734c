"""Capture on CUDA: the one-pass top-k (Triton kernel) against the CPU path and float64, and
hidden states encoded on the writer thread's stream against a plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.capture import run as capture_run
from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.capture.topk import logsum_and_group_max, topk_logprobs
from kdpipe.compress import Dataset
from kdpipe.compress.codecs.hidden import FP8_MAX, _scaled_encode
from tests.helpers import assert_exact_topk, docstring_texts, tied_logits, write_jsonl

pytestmark = pytest.mark.gpu


def logits(n: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 2
    x[: n // 4] = torch.randint(0, 4, (n // 4, vocab), generator=g).float()   # massive ties
    x[n // 4: n // 3, -100:] = 7.0                                           # last group wins
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [128004, 49152, 1000])
def test_cuda_topk_equals_cpu_and_float64(vocab, dtype):
    x = logits(300, vocab, dtype)
    logsum_gpu, gmax_gpu = logsum_and_group_max(x.cuda())
    logsum_cpu, gmax_cpu = logsum_and_group_max(x)
    assert torch.equal(gmax_gpu.cpu(), gmax_cpu)
    torch.testing.assert_close(logsum_gpu.cpu(), logsum_cpu, atol=2e-6, rtol=1e-6)
    ids, lp = topk_logprobs(x.cuda(), 128)
    ref_ids, _ = topk_logprobs(x, 128)
    assert torch.equal(ids.cpu(), ref_ids)
    x64 = x.double()
    assert torch.equal(ref_ids, torch.sort(-x64, dim=-1, stable=True).indices[:, :128])
    torch.testing.assert_close(lp.cpu().double(), torch.log_softmax(x64, -1).gather(-1, ref_ids),
                               atol=4e-6, rtol=0)


@pytest.mark.parametrize("group", [16, 32, 128])
def test_cuda_topk_is_the_same_for_every_group_size(group):
    x = logits(300, 128004, torch.bfloat16)
    ids, lp = topk_logprobs(x.cuda(), 128, group=group)
    ref_ids, ref_lp = topk_logprobs(x, 128)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(lp.cpu(), ref_lp, atol=4e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 100, 128, 1025])       # 1025: too many for the kernel
def test_cuda_topk_of_hard_rows_is_exact(k, dtype):
    x = tied_logits(215, 128004, dtype, seed=k)
    ids, lp = topk_logprobs(x.cuda(), k)
    assert_exact_topk(x, ids.cpu(), lp.cpu(), atol=4e-6)


def test_topk_never_waits_for_the_device():
    """Every shape inside the top-k follows from the input's: nothing is read back, so a
    capture's host goes on queueing while the GPU computes it."""
    x = logits(300, 128004, torch.bfloat16).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        topk_logprobs(x, 128)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fp8_hidden_encoding_on_cuda_is_bitwise_the_cpu_encoding():
    x = (torch.randn(257, 2560) * torch.logspace(-2, 2, 2560)).to(torch.bfloat16)
    to_fp8 = lambda v: v.to(torch.float8_e4m3fn)   # noqa: E731
    assert np.array_equal(_scaled_encode(x.cuda(), FP8_MAX, to_fp8),
                          _scaled_encode(x, FP8_MAX, to_fp8))


LAYERS = [0, 2, 3]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random 3-layer Llama with a byte-level BPE tokenizer trained here: no download,
    and small enough that the test is about the capture, not the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_teacher")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docstring_texts(40), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id)).save_pretrained(out)
    return out


def _capture(teacher, data, out, codec: str, writer: str = "auto") -> list:
    top_k = None if codec == "sampled" else 16      # the sampled codec keeps no top-k
    run_capture(CaptureOptions(model=str(teacher), data=str(data), out=str(out), top_k=top_k,
                               hidden_layers=",".join(map(str, LAYERS)), codec=codec,
                               device="cuda", dtype="float32", window=4, max_seq_len=96,
                               progress=False, writer=writer))
    return list(Dataset(str(out)).iter_documents(hidden_layers=LAYERS))


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_hidden_states_encoded_on_the_writer_stream(tmp_path, tiny_teacher, monkeypatch, writer):
    """Windows overlap: the writer thread encodes window w's hidden states on its own stream
    while window w+1's forward runs. What it stores must be the forward's values (exact
    codec, against a plain forward of each document alone), and encoding on the device
    must store what encoding in host memory stores (fp8, with the on-device budget at 0)."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docstring_texts(16, 500)])
    exact = _capture(tiny_teacher, data, tmp_path / "exact", "exact", writer)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).cuda().eval()
    for doc in exact:
        with torch.no_grad():
            states = model(torch.as_tensor(doc.input_ids, dtype=torch.long, device="cuda")[None],
                           output_hidden_states=True).hidden_states
        for layer in LAYERS[:-1]:   # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(doc.hidden[layer], states[layer][0].cpu(),
                                       atol=1e-4, rtol=1e-4)
    on_device = _capture(tiny_teacher, data, tmp_path / "device", "default", writer)
    monkeypatch.setattr(capture_run, "HIDDEN_ON_DEVICE_BYTES", 0)
    on_host = _capture(tiny_teacher, data, tmp_path / "host", "default", writer)
    assert len(on_device) == len(on_host) == len(exact) == 16
    for a, b in zip(on_device, on_host):
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs,
                                                                   b.topk_logprobs)
        for layer in LAYERS:
            assert torch.equal(a.hidden[layer], b.hidden[layer]), (a.doc_id, layer)


@pytest.mark.parametrize("codec", ["exact", "default", "sampled"])
def test_process_and_thread_writers_write_the_same_bytes_on_cuda(tmp_path, tiny_teacher, codec):
    """The process writer gets hidden states encoded on the GPU and copied through page-locked
    shared memory; the thread writer encodes them on its own stream: the files are the same.
    The top-k rows and the sampled draws leave the GPU in the writers too."""
    import hashlib

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docstring_texts(16, 500)])
    files = {}
    for writer in ("process", "thread"):
        out = tmp_path / writer
        _capture(tiny_teacher, data, out, codec, writer)
        files[writer] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(out.rglob("*")) if p.is_file()}
    assert "manifest.json" in files["thread"] and files["process"] == files["thread"]
