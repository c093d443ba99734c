"""The sampled teacher signal: its codec (exact round trips, refusals), the draws (seeded per
document, distributed as the teacher), the unbiased loss (its mean gradient over many draws is
the full-distribution KL gradient; a top-k renormalized teacher's is not), and training on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.capture.sampling import document_generator, sample_rows
from kdpipe.compress import Codec, Dataset, PartWriter, load_codec_config
from kdpipe.compress.codecs import IDS, VALUES
from kdpipe.schemas import (CaptureSettings, CodecConfig, CodecError, CodecMismatchError,
                            ConfigError, DatasetError, TeacherDocument)
from kdpipe.student_train.losses import sampled_loss
from kdpipe.student_train.sparse_kl import HeadTerm, head_losses

VOCAB, DRAWS = 3000, 24
CPU = torch.device("cpu")


def sampled_config(draws: int = DRAWS, **params) -> CodecConfig:
    return CodecConfig.from_dict({"name": "sampled-test",
                                  "ids": {"kind": "sampled", "draws": draws, **params},
                                  "values": "counts", "hidden": "native"})


def draw(rows: int, seed: int, *, vocab: int = VOCAB, draws: int = DRAWS, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    ids, counts = sample_rows(logits, draws, temperature=1.0, generator=g)
    return logits, ids, counts


def codec(draws: int = DRAWS, vocab: int = VOCAB) -> Codec:
    return Codec(sampled_config(draws), vocab_size=vocab, top_k=draws, hidden_size=4,
                 hidden_dtype="float32")


# -- draws and codec ---------------------------------------------------------------------------

def test_draws_are_distinct_ids_with_counts_in_sample_order():
    _, ids, counts = draw(50, seed=1)
    assert ids.shape == counts.shape == (50, DRAWS)
    assert torch.equal(counts.sum(1), torch.full((50,), DRAWS, dtype=counts.dtype))
    for i, c in zip(ids.tolist(), counts.tolist()):
        m = sum(x > 0 for x in c)
        assert all(x == -1 for x in i[m:]) and all(x == 0 for x in c[m:])
        assert len(set(i[:m])) == m
        assert [(-c[j], i[j]) for j in range(m)] == sorted((-c[j], i[j]) for j in range(m))


def test_same_seed_and_document_draw_the_same_samples():
    logits = torch.randn(7, 500, generator=torch.Generator().manual_seed(0))
    a = sample_rows(logits, 16, temperature=1.0, generator=document_generator(3, "doc-a", CPU))
    b = sample_rows(logits, 16, temperature=1.0, generator=document_generator(3, "doc-a", CPU))
    c = sample_rows(logits, 16, temperature=1.0, generator=document_generator(3, "doc-b", CPU))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("sizes", [[5, 0, 40, 1], [1], [0, 0]])
def test_codec_round_trips_exactly(sizes):
    c = codec()
    _, ids, counts = draw(sum(sizes), seed=2)
    bounds = np.cumsum([0] + sizes)
    blobs = [c.encode_samples(ids[a:b].numpy(), counts[a:b].numpy())
             for a, b in zip(bounds[:-1], bounds[1:])]
    got_ids, got_counts = c.decode_samples([b[0] for b in blobs], [b[1] for b in blobs], sizes)
    assert torch.equal(got_ids, ids) and torch.equal(got_counts, counts)
    # each component decodes alone, in the same stored order
    stored_ids = c.ids.decode([b[0] for b in blobs], sizes, CPU)
    stored_counts = c.values.decode([b[1] for b in blobs], sizes, CPU)
    assert torch.equal((stored_ids >= 0), (stored_counts > 0))


def test_codec_accepts_any_order_within_a_row():
    c = codec()
    _, ids, counts = draw(30, seed=3)
    m = (counts > 0).sum(1)
    shuffled_ids, shuffled_counts = ids.clone(), counts.clone()
    for r in range(30):
        p = torch.randperm(int(m[r]), generator=torch.Generator().manual_seed(r))
        shuffled_ids[r, :m[r]] = ids[r, p]
        shuffled_counts[r, :m[r]] = counts[r, p]
    blob = c.encode_samples(shuffled_ids.numpy(), shuffled_counts.numpy())
    got = c.decode_samples([blob[0]], [blob[1]], [30])
    assert torch.equal(got[0], ids) and torch.equal(got[1], counts)


def test_codec_refuses_bad_rows():
    c = codec(draws=4, vocab=100)
    good_ids = np.array([[5, 7, -1, -1]])
    good_counts = np.array([[3, 1, 0, 0]])
    c.encode_samples(good_ids, good_counts)
    cases = [
        (np.array([[5, 5, -1, -1]]), good_counts, "same id twice"),
        (good_ids, np.array([[2, 1, 0, 0]]), "add up to the 4 draws"),
        (np.array([[5, -1, 7, -1]]), np.array([[3, 0, 1, 0]]), "after its padding"),
        (good_ids, np.array([[3, 0, 1, 0]]), "disagree"),
        (np.array([[5, 100, -1, -1]]), good_counts, "outside the vocabulary"),
        (np.array([[-1, -1, -1, -1]]), np.array([[0, 0, 0, 0]]), "holds no sample"),
    ]
    for ids, counts, message in cases:
        with pytest.raises(CodecError, match=message):
            c.encode_samples(ids, counts)
    with pytest.raises(CodecError, match="sampled teacher signal, not the topk"):
        c.encode_rows(np.zeros((1, 4), np.int64), np.zeros((1, 4), np.float32))


def test_codec_refuses_corrupt_or_mismatched_blobs():
    c = codec()
    _, ids, counts = draw(20, seed=4)
    ids_b, counts_b = c.encode_samples(ids.numpy(), counts.numpy())
    flipped = bytearray(counts_b)
    flipped[-3] ^= 0x40
    with pytest.raises(CodecError):
        c.decode_samples([ids_b], [bytes(flipped)], [20])
    with pytest.raises(CodecMismatchError):
        codec(draws=DRAWS + 1).decode_samples([ids_b], [counts_b], [20])
    with pytest.raises(CodecError, match="holds 20 rows"):
        c.decode_samples([ids_b], [counts_b], [21])


def test_codec_configuration_is_checked():
    with pytest.raises(ConfigError, match="draws must be"):
        Codec(sampled_config(draws=0), vocab_size=VOCAB, top_k=1, hidden_size=4,
              hidden_dtype="float32")
    with pytest.raises(ConfigError, match="cannot be re-drawn"):
        Codec(sampled_config(draws=8), vocab_size=VOCAB, top_k=16, hidden_size=4,
              hidden_dtype="float32")
    with pytest.raises(ConfigError, match="temperature"):
        Codec(sampled_config(temperature=0), vocab_size=VOCAB, top_k=DRAWS, hidden_size=4,
              hidden_dtype="float32")
    mixed = CodecConfig.from_dict({"ids": {"kind": "sampled", "draws": 8}, "values": "float32",
                                   "hidden": "native"})
    with pytest.raises(ConfigError, match="signal"):
        Codec(mixed, vocab_size=VOCAB, top_k=8, hidden_size=4, hidden_dtype="float32")
    assert IDS["sampled"].capabilities.signal == VALUES["counts"].capabilities.signal == "sampled"
    preset = load_codec_config("sampled")
    assert preset.ids.kind == "sampled" and preset.values.kind == "counts"


def test_a_codec_is_never_both_dense_and_sampled(tmp_path):
    """Refused when the file is loaded (capture's first check) and when a manifest carrying
    such a configuration is decoded."""
    both = {**sampled_config().to_dict(), "name": "dense-sampled", "dense": True}
    path = tmp_path / "dense-sampled.json"
    path.write_text(json.dumps(both))
    with pytest.raises(ConfigError, match="dense-sampled.*dense: true.*sampled signal"):
        load_codec_config(str(path))
    with pytest.raises(ConfigError, match="dense: true.*sampled signal"):
        Codec(CodecConfig.from_dict(both), vocab_size=VOCAB, top_k=DRAWS, hidden_size=4,
              hidden_dtype="float32")


# -- the unbiased loss -------------------------------------------------------------------------

def _mean_gradient(student: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """Per-draw gradients of the sampled loss w.r.t. the student logits: (mean, std error)."""
    z = student.expand(ids.shape[0], -1).clone().requires_grad_(True)
    loss = sampled_loss(z, ids.clamp(min=0), weights)
    (g,) = torch.autograd.grad(loss.sum(), z)
    return g.mean(0), g.std(0) / math.sqrt(g.shape[0])


@pytest.mark.parametrize("draws", [1, 8])
def test_sampled_gradient_is_unbiased_for_the_full_kl(draws):
    V, M = 12, 20000
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(V, generator=g, dtype=torch.float64) * 2
    student = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    p = torch.softmax(teacher, -1)
    kl = (p * (p.log() - torch.log_softmax(student, -1))).sum()
    (exact,) = torch.autograd.grad(kl, student)
    ids, counts = sample_rows(teacher.expand(M, V), draws, temperature=1.0, generator=g)
    mean, se = _mean_gradient(student.detach(), ids, counts.double() / draws)
    # a few standard errors of the mean, plus float32 sampling probabilities' rounding
    assert bool(((mean - exact).abs() <= 5 * se + 1e-6).all()), (mean - exact) / se
    # the top-k renormalized teacher (k = 3) is off by many standard errors
    top = torch.zeros_like(p).scatter(0, p.topk(3).indices, p[p.topk(3).indices])
    biased = torch.softmax(student.detach(), -1) - top / top.sum()
    assert bool(((biased - exact).abs() > 5 * se + 1e-6).any())


def test_sampled_gradient_is_unbiased_at_a_temperature():
    V, M, T, draws = 10, 20000, 2.0, 4
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(V, generator=g, dtype=torch.float64) * 3
    student = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    p_t = torch.softmax(teacher / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / T, -1))).sum() * T ** 2
    (exact,) = torch.autograd.grad(kl, student)
    ids, counts = sample_rows(teacher.expand(M, V), draws, temperature=T, generator=g)
    z = student.detach().expand(M, V).clone().requires_grad_(True)
    loss = sampled_loss(z, ids.clamp(min=0), counts.double() / draws, temperature=T)
    (grads,) = torch.autograd.grad(loss.sum(), z)
    se = grads.std(0) / math.sqrt(M)
    assert bool(((grads.mean(0) - exact).abs() <= 5 * se + 1e-6).all())


def test_chunked_head_matches_unchunked_for_the_sampled_term():
    g = torch.Generator().manual_seed(7)
    R, H, V = 11, 6, 40
    hidden = torch.randn(R, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    _, ids, counts = draw(R, seed=8, vocab=V, draws=5)
    has = torch.rand(R, generator=g) > 0.2
    kw = dict(topk_ids=torch.zeros(R, 0, dtype=torch.long), topk_logprobs=torch.zeros(R, 0),
              tail=torch.zeros(R), has_teacher=has, labels=torch.full((R,), -100),
              terms=[HeadTerm("sampled", "sampled", 1.5)], sample_ids=ids.clamp(min=0),
              sample_weights=counts.float() / 5)
    whole = head_losses(hidden, weight, chunk_size=0, **kw)["sampled"]
    chunked = head_losses(hidden, weight, chunk_size=3, **kw)["sampled"]
    want = sampled_loss((hidden @ weight.T) / 1.0, ids.clamp(min=0), counts.double() / 5,
                        temperature=1.5)[has].sum()
    torch.testing.assert_close(whole, want)
    torch.testing.assert_close(chunked, want)
    g1 = torch.autograd.grad(whole, hidden)[0]
    g2 = torch.autograd.grad(chunked, hidden)[0]
    torch.testing.assert_close(g1, g2)


# -- datasets and training ---------------------------------------------------------------------

def write_sampled_toy(out: Path, *, n_docs: int, seed: int = 0, draws: int = 8,
                      temperature: float = 1.0) -> list[TeacherDocument]:
    """The toy bigram teacher's documents with ``draws`` samples per position."""
    from test_train_fixtures import HIDDEN, LAYERS, VOCAB as TOY_VOCAB, toy_teacher
    from kdpipe.schemas import TeacherInfo

    rng = np.random.default_rng(seed)
    logprobs, hidden = toy_teacher()
    teacher = TeacherInfo("toy", "ToyBigram", "0" * 64, TOY_VOCAB, HIDDEN, 2, "1" * 64,
                          {"bos": None, "eos": None, "pad": None, "unk": None}, "float32")
    capture = CaptureSettings("hf", draws, 64, "float32", False, list(LAYERS), "text",
                              "truncate", "toy")
    config = sampled_config(draws, temperature=temperature)
    w = PartWriter(str(out), teacher=teacher, capture=capture, codec=config, index=0, count=1,
                   docs_per_shard=9, row_group_bytes=6000)
    docs = []
    for i in range(n_docs):
        T = int(rng.integers(3, 41))
        ids = rng.integers(0, TOY_VOCAB, T).astype(np.int32)
        gen = document_generator(0, f"doc-{i:04d}", CPU)
        s_ids, s_counts = sample_rows(logprobs[torch.from_numpy(ids).long()], draws,
                                      temperature=temperature, generator=gen)
        doc = TeacherDocument(
            doc_id=f"doc-{i:04d}", input_ids=ids, topk_ids=torch.zeros(T, 0, dtype=torch.long),
            topk_logprobs=torch.zeros(T, 0), record_index=i, sample_ids=s_ids,
            sample_counts=s_counts,
            hidden={layer: hidden[layer][torch.from_numpy(ids).long()] for layer in LAYERS})
        w.add_record(i, [doc])
        w.end_window()
        docs.append(doc)
    w.finish()
    return docs


def test_dataset_round_trips_sampled_documents(tmp_path):
    docs = write_sampled_toy(tmp_path / "ds", n_docs=12)
    got = list(Dataset(str(tmp_path / "ds")).iter_documents(hidden_layers=[]))
    assert [d.doc_id for d in got] == [d.doc_id for d in docs]
    for a, b in zip(docs, got):
        assert torch.equal(a.sample_ids, b.sample_ids)
        assert torch.equal(a.sample_counts, b.sample_counts)
        assert b.topk_ids.shape == (a.num_tokens, 0)


def test_writer_refuses_a_document_without_samples(tmp_path):
    write_sampled_toy(tmp_path / "ok", n_docs=1)
    ds = Dataset(str(tmp_path / "ok"))
    doc = next(iter(ds.iter_documents()))
    doc.sample_ids = doc.sample_counts = None
    with PartWriter(str(tmp_path / "bad"), teacher=ds.manifest.teacher,
                    capture=ds.manifest.capture, codec=ds.manifest.codec, index=0,
                    count=1) as w:
        with pytest.raises(DatasetError, match="stores sampled teacher rows"):
            w.add_record(0, [doc])


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    from test_train_fixtures import write_dataset, write_student
    tmp = tmp_path_factory.mktemp("sampled-train")
    write_sampled_toy(tmp / "sampled", n_docs=30, draws=8)
    write_dataset(tmp / "topk", n_docs=30)
    write_dataset(tmp / "held", n_docs=6, seed=9)
    write_student(tmp / "student")
    return tmp


def _train(tmp: Path, data: Path, out: Path, terms: str, steps: int = 12, **extra):
    from test_train_fixtures import tiny_config
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer
    sets = tiny_config(tmp, data, tmp / "student", heldout=tmp / "held",
                       **{"out": str(out), "train.max_steps": steps, "loss.terms": terms,
                          "loss.layer_map": "[]", "eval.every": steps, **extra})
    Trainer(load_config(None, sets), overwrite=True).train()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_on_samples_lowers_the_loss_and_the_heldout_kl(toy_inputs, tmp_path):
    records = _train(toy_inputs, toy_inputs / "sampled", tmp_path / "run",
                     "[{kind: sampled, weight: 1.0}]", steps=16)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    losses = [r["loss_sampled"] for r in train]   # a cross-entropy: the teacher's entropy is
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1   # its floor, not 0
    assert evals[-1]["kl"] < evals[0]["kl"]


@pytest.mark.parametrize("data,terms,message", [
    ("sampled", "[{kind: kl}]", "needs top-k rows"),
    ("topk", "[{kind: sampled}]", "trains on sampled teacher rows"),
    ("sampled", "[{kind: sampled, temperature: 2.0}]", "sampled at temperature 1"),
])
def test_training_refuses_a_signal_mismatch(toy_inputs, tmp_path, data, terms, message):
    with pytest.raises(ConfigError, match=message):
        _train(toy_inputs, toy_inputs / data, tmp_path / "run", terms, steps=1)


def test_training_refuses_sampled_heldout_data(toy_inputs, tmp_path):
    from test_train_fixtures import tiny_config
    from kdpipe.student_train.train_config import load_config
    from kdpipe.student_train.trainer import Trainer
    sets = tiny_config(toy_inputs, toy_inputs / "sampled", toy_inputs / "student",
                       heldout=toy_inputs / "sampled",
                       **{"out": str(tmp_path / "run"), "loss.terms": "[{kind: sampled}]",
                          "loss.layer_map": "[]"})
    with pytest.raises(ConfigError, match="held-out data .* holds the sampled teacher signal"):
        Trainer(load_config(None, sets), overwrite=True).train()


# -- capture -----------------------------------------------------------------------------------

CAPTURE = dict(max_seq_len=48, window=2, docs_per_shard=2, hidden_layers="none",
               progress=False)


@pytest.fixture(scope="module")
def captured(tmp_path_factory, teacher_dir):
    """The same 16 records captured as ``exact`` and as ``sampled``."""
    from kdpipe.capture.run import CaptureOptions, run_capture
    from helpers import docstring_texts, write_jsonl
    tmp = tmp_path_factory.mktemp("sampled-capture")
    data = write_jsonl(tmp / "in.jsonl", [{"text": t} for t in docstring_texts(16, 300)])
    for codec in ("exact", "sampled"):
        run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(tmp / codec),
                                   codec=codec, **CAPTURE))
    return tmp


def test_capture_draws_from_the_teacher_distribution(captured):
    from kdpipe.compress.fidelity import evaluate_sampled
    exact, sampled = Dataset(str(captured / "exact")), Dataset(str(captured / "sampled"))
    assert sampled.manifest.capture.top_k == 32 and sampled.codec.signal == "sampled"
    assert json.loads((captured / "sampled" / "manifest.json").read_text())["codec"]["ids"] \
        == {"kind": "sampled", "draws": 32, "temperature": 1.0, "seed": 0}
    row = evaluate_sampled(exact, sampled)
    # the sampled cross-entropy of the teacher's own log-probs estimates its entropy
    assert abs(row.extra["sample_ce_bias"]) < 4 * row.extra["sample_ce_bias_stderr"]
    assert row.top1_agreement > 0.7 and row.extra["sample_tv_mean"] < 0.5
    assert row.bytes_per_token < 40


def test_killed_sampled_capture_resumes_byte_identical(captured, teacher_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from kdpipe.capture.run import CaptureOptions, run_capture
    out = tmp_path / "ds"
    args = [sys.executable, "-c", "from kdpipe.cli import main; main()", "capture", "--model",
            str(teacher_dir), "--data", str(captured / "in.jsonl"), "--out", str(out),
            "--codec", "sampled", "--max-seq-len", "48", "--window", "2", "--docs-per-shard",
            "2", "--no-progress"]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    frag = out / "parts" / "part-00000-of-00001.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if frag.exists() and json.loads(frag.read_text())["shards"]:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads(frag.read_text())["parts"][0]["complete"], "finished before the kill"
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(captured / "in.jsonl"),
                               out=str(out), codec="sampled", **CAPTURE))
    a, b = Dataset(str(captured / "sampled")).manifest, Dataset(str(out)).manifest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_capture_refuses_top_k_and_vllm_with_samples(captured, teacher_dir, tmp_path):
    from kdpipe.capture.run import CaptureOptions, run_capture
    base = dict(model=str(teacher_dir), data=str(captured / "in.jsonl"), codec="sampled",
                progress=False)
    with pytest.raises(ConfigError, match="keeps no top-k"):
        run_capture(CaptureOptions(out=str(tmp_path / "a"), top_k=8, **base))
    with pytest.raises(ConfigError, match="hf backend only"):
        run_capture(CaptureOptions(out=str(tmp_path / "b"), backend="vllm", **base))


def test_tools_understand_or_refuse_the_sampled_signal(captured, tmp_path, capsys, monkeypatch):
    from helpers import run_main
    sampled, exact = captured / "sampled", captured / "exact"
    code, out, _ = run_main(["inspect", sampled, "--json"], capsys, monkeypatch)
    split = json.loads(out)["bytes_per_token_split"]
    assert code == 0 and split["ids"] > 0 and split["values"] > 0
    assert split["ids"] + split["values"] < 40
    code, out, _ = run_main(["verify", "--deep", sampled], capsys, monkeypatch)
    assert code == 0 and "OK" in out
    code, _, _ = run_main(["dump", sampled, "--out", tmp_path / "d.npz", "--limit", 2], capsys,
                          monkeypatch)
    z = np.load(tmp_path / "d.npz")
    doc = next(iter(Dataset(str(sampled)).iter_documents()))
    ids, counts = z[f"{doc.doc_id}/sample_ids"], z[f"{doc.doc_id}/sample_counts"]
    assert ids.dtype == np.int64 and ids.shape == counts.shape
    assert ids.shape[0] == doc.num_tokens and (counts.sum(1) == 32).all()
    assert np.array_equal(ids, doc.sample_ids[:, :ids.shape[1]].numpy())
    assert not (doc.sample_counts[:, ids.shape[1]:] > 0).any()
    code, out, _ = run_main(["fidelity", exact, "--codecs", "exact", "--sampled", sampled,
                             "--json", tmp_path / "f.json"], capsys, monkeypatch)
    rows = json.loads((tmp_path / "f.json").read_text())
    assert code == 0 and [r["codec"] for r in rows] == ["exact", "sampled"]
    assert "sample_ce_bias" in rows[1] and "0 when unbiased" in out
    refusals = [
        (["fidelity", exact, "--codecs", "sampled"], "pass a sampled capture"),
        (["compress", exact, tmp_path / "c1", "--codec", "sampled"], "without bias"),
        (["compress", sampled, tmp_path / "c2", "--codec", "default"], "has no top-k"),
        (["export", "--format", "axolotl", sampled, tmp_path / "e1"], "cannot represent"),
        (["export", "--format", "distillkit", sampled, tmp_path / "e2"], "cannot represent"),
    ]
    for args, message in refusals:
        code, out, err = run_main(args, capsys, monkeypatch)
        assert code != 0 and message in out + err, (args, out, err)
    other = tmp_path / "seed1.yaml"
    other.write_text("ids: {kind: sampled, draws: 32, seed: 1}\nvalues: counts\nhidden: fp8\n")
    code, out, err = run_main(["compress", sampled, tmp_path / "c3", "--codec", other], capsys,
                              monkeypatch)
    assert code != 0 and "cannot be re-drawn" in out + err
    code, _, _ = run_main(["compress", sampled, tmp_path / "c4", "--codec", "sampled"], capsys,
                          monkeypatch)
    assert code == 0
    same = zip(Dataset(str(sampled)).iter_documents(), Dataset(str(tmp_path / "c4"))
               .iter_documents())
    assert all(torch.equal(a.sample_ids, b.sample_ids) for a, b in same)


@pytest.mark.gpu
def test_cuda_draws_are_seeded_and_unbiased():
    """On the GPU: the same document seed draws the same samples, and the sampled
    cross-entropy of the teacher's own log-probs estimates its entropy."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4096, 49152, device="cuda", generator=g).mul_(3).bfloat16()
    a = sample_rows(logits, 32, temperature=1.0,
                    generator=document_generator(0, "doc", "cuda"))
    b = sample_rows(logits, 32, temperature=1.0,
                    generator=document_generator(0, "doc", "cuda"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lp = torch.log_softmax(logits.double(), -1)
    ce = -(a[1].double() / 32 * lp.gather(1, a[0].clamp(min=0))).sum(1)
    err = ce - (-(lp.exp() * lp).sum(1))
    assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(len(err))
    c = codec(draws=32, vocab=49152)
    blob = c.encode_samples(a[0].cpu().numpy(), a[1].cpu().numpy())
    got = c.decode_samples([blob[0]], [blob[1]], [4096], "cuda")
    assert torch.equal(got[0], a[0]) and torch.equal(got[1], a[1])


@pytest.mark.gpu
def test_cuda_draws_never_wait_for_the_device():
    """A document's generator and its draws are queued like the top-k: nothing is read back,
    so a sampled capture's host goes on while the GPU draws."""
    logits = torch.randn(300, 49152, device="cuda").bfloat16()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_rows(logits, 32, temperature=1.0,
                    generator=document_generator(0, "doc", "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
