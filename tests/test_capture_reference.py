"""Capture against an independent transformers computation on the real embedded teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.capture.run import CaptureOptions, run_capture
from kdpipe.compress import Dataset
from tests.helpers import docstring_texts, write_jsonl

LAYERS = [0, 7, 30]
MAX_LEN = 80


@pytest.fixture(scope="module")
def captured(tmp_path_factory, teacher_dir):
    tmp = tmp_path_factory.mktemp("ref")
    texts = docstring_texts(5, max_chars=400)
    records = [{"text": t} for t in texts]
    records.append({"messages": [{"role": "user", "content": "What is a heap?"},
                                 {"role": "assistant", "content": texts[0][:70]}]})
    records.append({"text": "   "})                       # empty text
    records.append({"title": "no text field here"})       # missing field
    data = write_jsonl(tmp / "in.jsonl", records, raw_lines=[b"{not json", b'{"text": "\xff\xfe"}'])
    out = tmp / "ds"
    summary = run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out),
                                         top_k=16, hidden_layers=",".join(map(str, LAYERS)),
                                         max_seq_len=MAX_LEN, progress=False, window=4))
    return summary, Dataset(str(out)), records


def _reference(teacher_dir, ids: np.ndarray):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    kept = {}
    model.model.layers[-1].register_forward_hook(
        lambda m, i, o: kept.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long)[None], output_hidden_states=True)
    lp = torch.log_softmax(out.logits[0].double(), -1).float()   # float32 CPU log_softmax errs ~1e-5
    hidden = {0: out.hidden_states[0][0], 7: out.hidden_states[7][0], 30: kept["last"][0]}
    return lp, hidden


def test_counts_and_skips(captured):
    summary, ds, records = captured
    rec = ds.manifest.records
    assert rec.read == len(records) + 2
    assert rec.written == 6
    assert rec.skipped == {"empty text": 1, "missing field text": 1, "malformed json": 1,
                           "undecodable bytes": 1}
    assert rec.truncated >= 1          # 400-char docstrings exceed 80 tokens
    assert summary.complete and summary.documents == 6


def test_rows_match_independent_transformers(captured, teacher_dir):
    _, ds, _ = captured
    docs = list(ds.iter_documents())
    assert len(docs) == 6
    for doc in docs:
        T = doc.num_tokens
        assert T <= MAX_LEN and doc.topk_ids.shape == (T, 16)
        lp, hidden = _reference(teacher_dir, doc.input_ids)
        ref_lp = lp.gather(-1, doc.topk_ids)
        # batched (padded) vs single-sequence float32 differ by float noise: 1e-5 abs + rel
        torch.testing.assert_close(doc.topk_logprobs, ref_lp, atol=1e-5, rtol=1e-5)
        # ids: the exact top-16 by (value desc, id asc), up to float-level near ties
        order = torch.argsort(-lp.double() * 1e9 + torch.arange(lp.shape[1]) * 1e-9, dim=-1)
        ref_ids = order[:, :16]
        differ = doc.topk_ids != ref_ids
        if differ.any():
            gap = (lp.gather(-1, doc.topk_ids) - lp.gather(-1, ref_ids)).abs()[differ]
            assert float(gap.max()) < 1e-5, "ids differ beyond a near tie"
        for layer in LAYERS:
            got, want = doc.hidden[layer], hidden[layer]
            rel = (got - want).norm() / want.norm()
            assert rel < 1e-5, (layer, float(rel))


def test_chat_record_masks_assistant_tokens(captured, teacher_dir):
    from transformers import AutoTokenizer
    _, ds, records = captured
    chat = [d for d in ds.iter_documents() if d.loss_mask is not None]
    assert len(chat) == 1
    doc = chat[0]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    # rows flagged for training predict exactly the assistant reply and its end of turn
    predicted = doc.input_ids[1:][doc.loss_mask[:-1]]
    text = tok.decode(predicted)
    assert text.startswith(records[5]["messages"][1]["content"][:40])
    assert text.rstrip().endswith("<|im_end|>")
    assert not doc.loss_mask[-1]


def test_top_k_defaults_to_the_codecs(tmp_path, teacher_dir):
    """Without --top-k the teacher computes just the log-probs the codec keeps."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docstring_texts(2, 200)])
    out = tmp_path / "ds"
    run_capture(CaptureOptions(model=str(teacher_dir), data=str(data), out=str(out),
                               codec="small", max_seq_len=32, progress=False))
    ds = Dataset(str(out))
    assert ds.manifest.capture.top_k == 50
    assert next(iter(ds.iter_documents())).topk_ids.shape[1] == 50
