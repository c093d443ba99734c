"""Dense datasets of the embedded teacher: the rebuilt distribution is the teacher's own, dump
writes it, fidelity measures the dense presets against it, verify guards the head, and what
cannot make a dense dataset refuses to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import capture_small, run_main
from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset, load_codec_config
from kdpipe.compress.dense import HEAD_ARTIFACT, dense_layer, full_logprobs, load_head
from kdpipe.compress.fidelity import evaluate, load_sample
from kdpipe.schemas import ConfigError


@pytest.fixture(scope="module")
def dense(tmp_path_factory, teacher_dir):
    """The embedded teacher over 3 short documents, dense-exact (float32 on the CPU)."""
    return capture_small(tmp_path_factory.mktemp("dense") / "exact", teacher_dir, n_docs=3,
                         codec="dense-exact", top_k=128, hidden_layers="none")


def test_rebuilt_distribution_is_the_teachers_forward(dense):
    ds = Dataset(str(dense))
    layer = dense_layer(ds.manifest)
    assert ds.manifest.capture.hidden_layers == [layer] == [30]
    assert HEAD_ARTIFACT in ds.manifest.artifacts
    head = load_head(ds)
    assert (head.vocab_size, head.hidden_size) == (49152, 576)
    n = 0
    for doc in ds.iter_documents():
        lp = full_logprobs(head, doc.hidden[layer])
        top = lp.topk(128, dim=1)
        assert torch.equal(top.indices[:, :16], doc.topk_ids[:, :16])   # no near-ties there
        torch.testing.assert_close(top.values, doc.topk_logprobs, atol=1e-4, rtol=0)
        n += doc.num_tokens
    assert n > 40


def test_dump_writes_full_logprobs(dense, tmp_path, capsys, monkeypatch):
    code, out, _ = run_main(["dump", dense, "--out", tmp_path / "d.npz"], capsys, monkeypatch)
    assert code == 0, out
    z = np.load(tmp_path / "d.npz")
    docs = [k.removesuffix("/logprobs") for k in z.files if k.endswith("/logprobs")]
    assert len(docs) == 3
    for d in docs:
        lp = z[f"{d}/logprobs"]
        assert lp.dtype == np.float32 and lp.shape == (len(z[f"{d}/input_ids"]), 49152)
        np.testing.assert_allclose(np.logaddexp.reduce(lp.astype(np.float64), axis=1), 0,
                                   atol=5e-5)   # float32 over 49k entries
        top = np.sort(lp, axis=1)[:, ::-1][:, :128]
        np.testing.assert_allclose(top, z[f"{d}/topk_logprobs"], atol=1e-4)


def test_fidelity_of_the_dense_presets(dense):
    sample = load_sample(Dataset(str(dense)))
    rows = {c: evaluate(sample, load_codec_config(c)) for c in
            ("dense-exact", "dense-bf16", "dense-fp8")}
    assert rows["dense-exact"].kl_full_mean == 0.0
    assert rows["dense-exact"].top1_agreement == 1.0
    assert 0 < rows["dense-bf16"].kl_full_mean <= 1e-4
    assert rows["dense-bf16"].kl_full_mean < rows["dense-fp8"].kl_full_mean < 0.05
    # bytes: the kept top-1 plus the last layer, 2 bytes a dimension or 1 plus a scale
    assert rows["dense-bf16"].hidden_bytes_per_token_layer == 2 * 576
    assert rows["dense-fp8"].hidden_bytes_per_token_layer == 576 + 2
    assert rows["dense-bf16"].bytes_per_token == 2 * 576 + 8
    # against the true distribution, even the exact top-128 pays for the tail it drops (its
    # mass spread evenly), far more than fp8 rounding of the last layer does
    exact = evaluate(sample, load_codec_config("exact"))
    assert exact.kl_topk_mean == 0.0
    assert exact.extra["kl_true_full_mean"] > 10 * rows["dense-fp8"].kl_full_mean
    assert rows["dense-fp8"].extra["kl_true_full_mean"] == rows["dense-fp8"].kl_full_mean


def test_compress_to_dense_verify_and_a_replaced_head(dense, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "bf16"
    code, out, err = run_main(["compress", dense, dst, "--codec", "dense-bf16"], capsys,
                              monkeypatch)
    assert code == 0, err
    ds = Dataset(str(dst))
    assert ds.manifest.artifacts[HEAD_ARTIFACT] == \
        Dataset(str(dense)).manifest.artifacts[HEAD_ARTIFACT]
    code, out, _ = run_main(["verify", dst, "--deep"], capsys, monkeypatch)
    assert code == 0 and "OK" in out
    # a head replaced by another of the same size: verify names it, dump and training refuse
    path = dst / HEAD_ARTIFACT
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    code, out, err = run_main(["verify", dst], capsys, monkeypatch)
    assert code == 1
    assert f"BAD  {HEAD_ARTIFACT}:" in err and "sha256" in err
    code, _, err = run_main(["dump", dst, "--out", tmp_path / "x.npz"], capsys, monkeypatch)
    assert code != 0 and "teacher_head.safetensors: codec artifact has sha256" in err
    # a top-k dataset cannot become dense
    exact = tmp_path / "exact"
    assert run_main(["compress", dense, exact, "--codec", "exact"], capsys, monkeypatch)[0] == 0
    code, _, err = run_main(["compress", exact, tmp_path / "no", "--codec", "dense-fp8"], capsys,
                            monkeypatch)
    assert code != 0 and "not a dense dataset" in err
    # fidelity over every preset on a top-k dataset leaves the dense ones out
    code, out, _ = run_main(["fidelity", exact], capsys, monkeypatch)
    assert code == 0 and "| default |" in out and "| dense-" not in out


def test_dense_capture_needs_the_hf_backend(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="dense codecs need .* only --backend hf provides"):
        run_capture(CaptureOptions(model=str(teacher_dir), data=str(tmp_path / "x.jsonl"),
                                   out=str(tmp_path / "o"), backend="vllm", codec="dense-fp8"))
