"""Packing documents into sequences, and assembling a packed micro-batch from decoded documents.

``pack_documents`` is a pure numpy function of the document lengths. ``assemble`` turns the
pieces of a micro-batch plus the decoded ``TeacherDocument``s into one packed row for the
student (``cu_seqlens`` keeps every piece a separate document) and the loss targets, with
the teacher rows of a cut document aligned to its tokens: row t of a document is the
teacher's distribution after token t wherever the piece holding t sits.

Training rows ("loss rows") are the positions whose ``loss_mask`` is set and that have a
teacher row or a next-token label (the last token of a document has no label, but its
teacher row, the distribution after the document, is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from kdpipe.runtime import to_device
from kdpipe.schemas import TeacherDocument

IGNORE = -100


def pack_documents(lengths: np.ndarray, seq_len: int,
                   mode: str = "whole") -> tuple[np.ndarray, ...]:
    """Cut documents (in the given order) into sequences of at most ``seq_len`` tokens.

    Returns four int64 arrays with one entry per piece, ordered by sequence then position:
    ``seq`` (sequence index), ``doc`` (index into ``lengths``), ``start`` (first token of the
    piece within its document) and ``length``.

    ``concat``: documents laid end to end and cut every ``seq_len`` tokens; every sequence but
    the last is full, and a document may straddle sequences.
    ``whole``: a document that fits in one sequence is never cut: when it does not fit in the
    space left, the sequence is closed short and the document opens the next one. A document
    longer than ``seq_len`` is laid out as in ``concat`` from where the sequence stands.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if mode == "concat":
        return _pack_concat(lengths, seq_len)
    if mode != "whole":
        raise ValueError(f"unknown packing mode {mode!r}")
    # Where each document starts in the token stream once sequences closed early are padded
    # out to seq_len; after that it is concat arithmetic on the padded stream.
    pos = 0
    starts = np.empty(len(lengths), np.int64)
    for i, n in enumerate(lengths.tolist()):
        used = pos % seq_len
        if used and n <= seq_len and used + n > seq_len:
            pos += seq_len - used
        starts[i] = pos
        pos += n
    return _cut(starts, lengths, seq_len)


def _pack_concat(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, ...]:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    return _cut(starts, lengths, seq_len)


def _cut(starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, ...]:
    """Pieces of documents at stream offsets ``starts`` cut at every multiple of seq_len."""
    keep = lengths > 0
    doc_idx = np.nonzero(keep)[0]
    s, n = starts[keep], lengths[keep]
    if not len(s):
        z = np.zeros(0, np.int64)
        return z, z, z, z
    first_seq = s // seq_len
    last_seq = (s + n - 1) // seq_len
    count = last_seq - first_seq + 1                              # pieces per document
    doc = np.repeat(doc_idx, count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # piece # in doc
    seq = np.repeat(first_seq, count) + k
    lo = np.maximum(seq * seq_len, np.repeat(s, count))
    hi = np.minimum((seq + 1) * seq_len, np.repeat(s + n, count))
    start = lo - np.repeat(s, count)
    # sequences closed early leave gaps; renumber sequences densely
    uniq, seq_dense = np.unique(seq, return_inverse=True)
    return seq_dense.astype(np.int64), doc.astype(np.int64), start, (hi - lo)


@dataclass
class PackedBatch:
    """One micro-batch: documents packed into one row, plus the targets of its loss rows.

    Shapes: N packed tokens, R loss rows, k teacher top-k (0 for sampled data), m draws per
    position of sampled data (0 for top-k data), H teacher hidden size.
    """

    input_ids: torch.Tensor          # [1, N] int64
    cu_seqlens: torch.Tensor         # [pieces + 1] int32
    row_pos: torch.Tensor            # [R] int64  position of each loss row in the row
    labels: torch.Tensor             # [R] int64  next token, IGNORE where there is none
    has_teacher: torch.Tensor        # [R] bool
    topk_ids: torch.Tensor           # [R, k] int64 (zeros where has_teacher is false)
    topk_logprobs: torch.Tensor      # [R, k] float32
    tail: torch.Tensor               # [R] float32  teacher mass outside the top-k (stored
                                     #   by the codec where it keeps it, else recomputed)
    hidden_pos: torch.Tensor         # [n] int64  positions the hidden-state losses use
    sample_ids: torch.Tensor         # [R, m] int64  sampled signal: distinct drawn ids (0 in
                                     #   padding); m = 0 for top-k data
    sample_weights: torch.Tensor     # [R, m] float32  count / draws (0 in padding)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [N, H]
    doc_ids: list[str] = field(default_factory=list)                # per piece (diagnostics)
    piece_starts: list[int] = field(default_factory=list)           # per piece
    # Known on the host when the batch is assembled, so that training reads no device tensor
    # back (a read waits for all the work queued before it): ``cu_seqlens`` as plain ints
    # (which DDP and FSDP leave where they are when they move a module's inputs), and the loss
    # normalizers ``counts`` returns.
    bounds: list[int] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Real tokens (a filler batch holds one placeholder token that trains nothing)."""
        return self.sizes["tokens"]

    def counts(self) -> dict[str, int]:
        """Normalizers of the losses: teacher rows, label rows, hidden positions, tokens."""
        return dict(self.sizes)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "PackedBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark the CUDA tensors as used on ``stream``, so the allocator keeps their memory
        until that stream's work is done (they were made on another stream)."""
        for t in self._tensors():
            if t.is_cuda:
                t.record_stream(stream)

    def pin_memory(self) -> "PackedBatch":
        """Called by a DataLoader with ``pin_memory=True`` (CUDA training)."""
        return self._map(lambda t: t if t.is_cuda else t.pin_memory())

    def _tensors(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                yield v
        yield from self.hidden.values()

    def _map(self, fn) -> "PackedBatch":
        """A batch with ``fn`` applied to every tensor."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif f.name == "hidden":
                v = {k: fn(t) for k, t in v.items()}
            out[f.name] = v
        return PackedBatch(**out)


def _teacher_row_index(doc: TeacherDocument) -> np.ndarray:
    """[T] index of each position's teacher row within the document, -1 where it has none."""
    if doc.teacher_mask is None:
        return np.arange(doc.num_tokens, dtype=np.int64)
    tm = np.asarray(doc.teacher_mask, bool)
    return np.where(tm, np.cumsum(tm) - 1, -1).astype(np.int64)


def missing_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[R, k] log-probs -> [R] probability mass outside them (float64 sum, clamped at 0)."""
    return (1.0 - topk_logprobs.double().exp().sum(-1)).clamp(min=0.0).float()


def teacher_tail(doc: TeacherDocument) -> torch.Tensor:
    """[N] mass outside each teacher row's top-k: as the codec stored it, else recomputed from
    the decoded top-k (where the values are quantized, their k rounding errors add up in the
    sum; docs/format.md measures both)."""
    if doc.tail_mass is not None:
        return doc.tail_mass.float()
    return missing_mass(doc.topk_logprobs)


def _sample_rows(doc: TeacherDocument, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, draws] ids (padding 0) and weights ``count / draws`` of a document's sampled rows
    ([N, 0] for top-k data)."""
    if not draws:
        empty = torch.zeros(doc.num_teacher_rows, 0, dtype=torch.long,
                            device=doc.topk_ids.device)
        return empty, empty.float()
    return doc.sample_ids.clamp(min=0), doc.sample_counts.float() / draws


def assemble(docs: dict[int, TeacherDocument], pieces: list[tuple[int, int, int]], *,
             k: int, hidden_layers: list[int] = (), hidden_size: int = 1,
             draws: int = 0) -> PackedBatch:
    """Pack ``pieces`` ([(doc key, start, length)], in order) of decoded documents.
    ``draws``: the width of sampled rows (sampled data, whose ``k`` is 0), else 0.

    Works per piece and per document, never per position: positions are handled by numpy
    and torch indexing. With no pieces, returns a filler batch (one placeholder token, no
    loss rows) so every rank runs the same number of forwards.
    """
    if not pieces:
        return _filler(k, hidden_layers, hidden_size, draws)
    keys = sorted({p[0] for p in pieces})
    # Everything of the used documents, concatenated once: tokens, teacher rows, hidden.
    tok_off, tok_parts, row_idx_parts, loss_parts = {}, [], [], []
    t_total = r_total = 0
    for key in keys:
        d = docs[key]
        tok_off[key] = t_total
        tok_parts.append(np.asarray(d.input_ids, np.int64))
        ridx = _teacher_row_index(d)
        row_idx_parts.append(np.where(ridx >= 0, ridx + r_total, -1))
        loss_parts.append(np.ones(d.num_tokens, bool) if d.loss_mask is None
                          else np.asarray(d.loss_mask, bool))
        t_total += d.num_tokens
        r_total += d.num_teacher_rows
    all_ids = np.concatenate(tok_parts)
    all_rows = np.concatenate(row_idx_parts)
    all_loss = np.concatenate(loss_parts)
    # next-token label of every position of the used documents (none after a document's end)
    all_next = np.full(t_total, IGNORE, np.int64)
    for key in keys:
        o, n = tok_off[key], docs[key].num_tokens
        all_next[o:o + n - 1] = all_ids[o + 1:o + n]
    # gather the packed positions
    gather = np.concatenate([np.arange(tok_off[key] + s, tok_off[key] + s + n)
                             for key, s, n in pieces])
    lengths = np.array([n for _, _, n in pieces], np.int64)
    ids = all_ids[gather]
    rows = all_rows[gather]
    labels = all_next[gather]
    loss = all_loss[gather]
    is_row = loss & ((rows >= 0) | (labels != IGNORE))
    row_pos = np.nonzero(is_row)[0]
    topk_ids = torch.cat([docs[key].topk_ids for key in keys]).long()
    topk_lps = torch.cat([docs[key].topk_logprobs for key in keys]).float()
    tails = (torch.cat([teacher_tail(docs[key]) for key in keys]) if k
             else torch.zeros(len(topk_ids), device=topk_ids.device))
    samples = [_sample_rows(docs[key], draws) for key in keys]
    s_ids = torch.cat([x for x, _ in samples])
    s_w = torch.cat([w for _, w in samples])
    sel = rows[row_pos]
    dev = topk_ids.device              # decoded on the training device or on the CPU
    has_teacher = to_device(torch.from_numpy(sel >= 0), dev)
    sel_t = to_device(torch.from_numpy(np.where(sel >= 0, sel, 0)), dev)
    if len(topk_ids):
        r_ids = topk_ids[sel_t] * has_teacher[:, None]
        r_lps = topk_lps[sel_t] * has_teacher[:, None]
        r_tail = torch.where(has_teacher, tails[sel_t], 0.0)
        r_sids = s_ids[sel_t] * has_teacher[:, None]
        r_sw = s_w[sel_t] * has_teacher[:, None]
    else:
        r_ids = torch.zeros(len(sel), k, dtype=torch.long, device=dev)
        r_lps = torch.zeros(len(sel), k, device=dev)
        r_tail = torch.zeros(len(sel), device=dev)
        r_sids = torch.zeros(len(sel), draws, dtype=torch.long, device=dev)
        r_sw = torch.zeros(len(sel), draws, device=dev)
    hidden = {}
    gather_t = to_device(torch.from_numpy(gather), dev)
    for layer in hidden_layers:
        h = torch.cat([docs[key].hidden[layer] for key in keys])
        hidden[layer] = h[gather_t]
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).int()
    hidden_pos = np.nonzero(loss)[0]
    return PackedBatch(
        input_ids=to_device(torch.from_numpy(ids)[None], dev),
        cu_seqlens=to_device(cu, dev),
        row_pos=to_device(torch.from_numpy(row_pos), dev),
        labels=to_device(torch.from_numpy(labels[row_pos]), dev),
        has_teacher=has_teacher,
        topk_ids=r_ids, topk_logprobs=r_lps,
        tail=r_tail,
        hidden_pos=to_device(torch.from_numpy(hidden_pos), dev),
        sample_ids=r_sids, sample_weights=r_sw,
        hidden=hidden,
        doc_ids=[docs[key].doc_id for key, _, _ in pieces],
        piece_starts=[int(s) for _, s, _ in pieces],
        bounds=cu.tolist(),
        sizes={"kd_rows": int((sel >= 0).sum()), "ce_rows": int((labels[row_pos] != IGNORE).sum()),
               "hidden_tokens": len(hidden_pos), "tokens": int(lengths.sum())})


def _filler(k: int, hidden_layers, hidden_size: int, draws: int) -> PackedBatch:
    return PackedBatch(
        input_ids=torch.zeros(1, 1, dtype=torch.long),
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
        row_pos=torch.zeros(1, dtype=torch.long),
        labels=torch.full((1,), IGNORE, dtype=torch.long),
        has_teacher=torch.zeros(1, dtype=torch.bool),
        topk_ids=torch.zeros(1, k, dtype=torch.long),
        topk_logprobs=torch.zeros(1, k),
        tail=torch.zeros(1),
        hidden_pos=torch.zeros(0, dtype=torch.long),
        sample_ids=torch.zeros(1, draws, dtype=torch.long),
        sample_weights=torch.zeros(1, draws),
        hidden={layer: torch.zeros(1, hidden_size) for layer in hidden_layers},
        bounds=[0, 1],
        sizes={"kd_rows": 0, "ce_rows": 0, "hidden_tokens": 0, "tokens": 0})
