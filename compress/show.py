"""``kdpipe show``: one document's tokens beside the teacher's top tokens, decoded.

For looking at a capture before training on it: whether the text is what was meant to be
captured, and whether the teacher's distributions look sane. Tokens are decoded with the
teacher's tokenizer, found where the manifest says the teacher was (or ``--tokenizer``)
and accepted only if its fingerprint is the one recorded at capture; otherwise the ids
are shown, with a line saying why.
"""

from __future__ import annotations

import math
from typing import Any

from kdpipe.schemas import (ConfigError, DatasetError, TeacherDocument, TeacherInfo,
                            tokenizer_fingerprint)
from kdpipe.schemas.layout import embedded_teacher_dir, is_embedded_teacher

from .reader import Dataset

TOKEN_WIDTH = 16


def load_tokenizer(teacher: TeacherInfo, path: str | None = None) -> tuple[Any | None, str]:
    """(the teacher's tokenizer or None, a line saying which one is used or why none is).

    A tokenizer given explicitly (``path``) must match the capture's fingerprint; the one
    the manifest points to may be missing here (dataset copied to another machine), and
    then the ids are shown."""
    source = path or teacher.name_or_path
    if not path and is_embedded_teacher(source):
        source = str(embedded_teacher_dir())
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:  # missing path, hub id not in the cache, no tokenizer files
        if path:
            raise ConfigError(f"--tokenizer {path}: cannot load a tokenizer from it "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return None, (f"tokenizer of {source} is not available locally; showing token ids "
                      f"(give --tokenizer DIR to decode them)")
    if teacher.tokenizer_sha256 and tokenizer_fingerprint(tok) != teacher.tokenizer_sha256:
        if path:
            raise ConfigError(f"--tokenizer {path}: not the tokenizer the dataset was captured "
                              f"with (fingerprint differs from the manifest's "
                              f"{teacher.tokenizer_sha256[:16]}...)")
        return None, (f"tokenizer at {source} is not the one the dataset was captured with; "
                      f"showing token ids")
    return tok, f"tokenizer   {source}"


def read_document(ds: Dataset, index: int) -> TeacherDocument:
    """Document ``index`` in dataset order, decoding only the shard that holds it."""
    total = ds.manifest.documents
    if not 0 <= index < total:
        raise ConfigError(f"--doc {index}: {ds.uri} holds {total} documents "
                          f"(indices 0 to {total - 1})")
    first = 0
    for entry in ds.shards:
        if index < first + entry.documents:
            for i, doc in enumerate(ds.iter_documents(hidden_layers=[], shards=[entry])):
                if first + i == index:
                    return doc
        first += entry.documents
    raise DatasetError(f"document {index} is listed but missing from its shard",
                       file=ds.storage.describe("manifest.json"))


def _probability(lp: float) -> str:
    p = math.exp(lp)
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _token(tok: Any | None, token_id: int) -> str:
    if tok is None:
        return str(token_id)
    text = repr(tok.decode([token_id]))
    return text if len(text) <= TOKEN_WIDTH else text[:TOKEN_WIDTH - 1] + "…"


def format_document(ds: Dataset, index: int, *, start: int = 0, rows: int = 16, top: int = 5,
                    tokenizer: str | None = None) -> list[str]:
    """The lines ``kdpipe show`` prints for positions [start, start + rows) of a document."""
    m = ds.manifest
    doc = read_document(ds, index)
    tok, tok_line = load_tokenizer(m.teacher, tokenizer)
    T = doc.num_tokens
    if T and not 0 <= start < T:
        raise ConfigError(f"--start {start}: document {index} has {T} tokens")
    end = min(T, start + rows)
    if doc.sample_ids is not None:
        return _format_samples(doc, index, m, tok, tok_line, start, end, top)
    top = min(top, doc.topk_ids.shape[1])
    has_row = [True] * T if doc.teacher_mask is None else doc.teacher_mask.tolist()
    row_of = {}
    for t in range(T):
        if has_row[t]:
            row_of[t] = len(row_of)
    ids = doc.input_ids.tolist()
    lines = [f"document    {index} of {m.documents}: {doc.doc_id}, {T} tokens, "
             f"{doc.num_teacher_rows} teacher rows, top-{doc.topk_ids.shape[1]} of "
             f"{m.teacher.vocab_size}",
             f"teacher     {m.teacher.name_or_path}", tok_line]
    if tok is not None:
        lines.append(f"text        {tok.decode(ids[start:end])!r}")
    k = doc.topk_ids.shape[1]
    lines += ["", f"{'pos':>5}  {'token':<{TOKEN_WIDTH}}  {'next':<{TOKEN_WIDTH}}  teacher's "
                  f"top {top} with probabilities (* = next token); rest = beyond the top {k}"]
    for t in range(start, end):
        nxt = _token(tok, ids[t + 1]) if t + 1 < T else "(end)"
        head = f"{t:>5}  {_token(tok, ids[t]):<{TOKEN_WIDTH}}  {nxt:<{TOKEN_WIDTH}}"
        if not has_row[t]:
            lines.append(f"{head}  (no teacher row)")
            continue
        r = row_of[t]
        lps = doc.topk_logprobs[r].tolist()
        cells = [f"{_token(tok, i)}{'*' if t + 1 < T and i == ids[t + 1] else ''} "
                 f"{_probability(lp)}" for i, lp in zip(doc.topk_ids[r, :top].tolist(), lps)]
        rest = max(0.0, 1.0 - sum(math.exp(lp) for lp in lps))
        trained = "" if doc.loss_mask is None or doc.loss_mask[t] else "  [not trained]"
        lines.append(f"{head}  {'  '.join(cells)}  rest {rest:.3f}{trained}")
    return lines


def _format_samples(doc, index: int, m, tok, tok_line: str, start: int, end: int,
                    top: int) -> list[str]:
    """``format_document`` for the sampled signal: the most drawn ids with count / draws."""
    T, draws = doc.num_tokens, doc.sample_ids.shape[1]
    has_row = [True] * T if doc.teacher_mask is None else doc.teacher_mask.tolist()
    ids = doc.input_ids.tolist()
    lines = [f"document    {index} of {m.documents}: {doc.doc_id}, {T} tokens, "
             f"{doc.num_teacher_rows} teacher rows, {draws} draws each from "
             f"{m.teacher.vocab_size} tokens",
             f"teacher     {m.teacher.name_or_path}", tok_line]
    if tok is not None:
        lines.append(f"text        {tok.decode(ids[start:end])!r}")
    lines += ["", f"{'pos':>5}  {'token':<{TOKEN_WIDTH}}  {'next':<{TOKEN_WIDTH}}  the {top} "
                  f"most drawn tokens with count / draws (* = next token); distinct = ids drawn"]
    r = sum(has_row[:start])
    for t in range(start, end):
        nxt = _token(tok, ids[t + 1]) if t + 1 < T else "(end)"
        head = f"{t:>5}  {_token(tok, ids[t]):<{TOKEN_WIDTH}}  {nxt:<{TOKEN_WIDTH}}"
        if not has_row[t]:
            lines.append(f"{head}  (no teacher row)")
            continue
        counts = doc.sample_counts[r].tolist()
        cells = [f"{_token(tok, i)}{'*' if t + 1 < T and i == ids[t + 1] else ''} "
                 f"{c / draws:.3f}" for i, c in zip(doc.sample_ids[r, :top].tolist(), counts)
                 if c > 0]
        trained = "" if doc.loss_mask is None or doc.loss_mask[t] else "  [not trained]"
        lines.append(f"{head}  {'  '.join(cells)}  distinct {sum(c > 0 for c in counts)}"
                     f"{trained}")
        r += 1
    return lines
