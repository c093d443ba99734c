"""Fidelity of codecs against an exact dataset: bytes, divergences, speed.

Every codec re-encodes the same exact rows (document by document, as capture does) and
decodes them again in batches of whole documents of about ``batch_tokens`` positions
(8192 by default: one training sequence of a long-context run). Measured per codec:

* bytes per token of ids and of values (encoded blobs / rows with a teacher row), and
  of hidden states per token and layer;
* KL(exact || decoded) over the top-k renormalized to 1 (k = the codec's k, against
  the exact top-k of the same k): mean and p99 over positions;
* KL against the full distribution: the exact top-K captured plus its missing mass
  spread evenly over the rest of the vocabulary, against the decoded top-k plus the
  decoded (or derived) missing mass spread likewise -- truncation and codec together;
* mean |delta log-prob| over the top-k entries; top-1 agreement (the decoded most
  probable token, ties to the smallest id, is the exact one);
* hidden-state cosine per token, also without the massive-activation dimensions (the
  1% of dimensions, at least one, with the largest mean |x| in the sample);
* encode and decode throughput of ids + values, in rows (tokens) per second.

A dense codec (``dense: true``) is measured on what it adds, against a dense exact dataset
(``dense-exact``, captured in float32): its bytes per token are the top-k it keeps plus the
last layer's hidden state, and its KL is that of the full distribution rebuilt from the decoded
hidden state against the one rebuilt from the exact state (the teacher's own forward), over
the whole vocabulary; top-1 compares the two argmaxes, mean |delta log-prob| runs over the
exact top-k ids, and the throughputs are of encoding the hidden state and of decoding it and
rebuilding the distributions.

On a dense sample every codec also gets ``kl_true_full_mean`` (in the JSON): KL against the
teacher's true full distribution, so top-k codecs are charged for the tail they drop.

The sampled signal cannot be made from stored top-k rows (``check_recode``), so its row
(``evaluate_sampled``) scores a sampled capture of the same records against the exact one:
its stored bytes, whether the most drawn id is the exact top-1, and, with ``p`` the exact
distribution (top-K plus the missing mass spread evenly, as above) and ``w = count /
draws``: the mean of ``sum_j w_j (-log p(id_j)) - H(p)`` (``sample_ce_bias``: the error of
the sampled cross-entropy estimate, 0 in expectation for an unbiased one, with its standard
error) and the mean total variation ``sum |w - p| / 2`` (``sample_tv_mean``: the noise of
the estimate at this number of draws). The KL columns do not apply to it (NaN).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from kdpipe.schemas import CodecConfig, ComponentSpec, ConfigError

from .codec import Codec, needs_fitting, sampling_of
from .codecs.hidden import fit_lowrank
from .dense import TeacherHead, dense_layer, load_head
from .reader import Dataset

MASSIVE_FRACTION = 0.01
LOWRANK_ARTIFACT = "artifacts/hidden_lowrank.safetensors"


@dataclass
class Sample:
    """Exact rows and hidden states of a set of documents, as captured."""

    ids: list[np.ndarray]                 # per document [N_d, K] int64
    logprobs: list[np.ndarray]            # per document [N_d, K] float32
    hidden: dict[int, list[torch.Tensor]]  # layer -> per document [T_d, H]
    vocab_size: int
    hidden_size: int
    hidden_dtype: str
    head: TeacherHead | None = None       # a dense dataset's teacher head
    dense_layer: int | None = None        # and the layer its distributions come from

    @property
    def rows(self) -> list[int]:
        return [a.shape[0] for a in self.ids]

    @property
    def k(self) -> int:
        return self.ids[0].shape[1]


@dataclass
class FidelityRow:
    codec: str
    k: int
    bytes_per_token: float            # ids + values
    ids_bytes_per_token: float
    values_bytes_per_token: float
    hidden_bytes_per_token_layer: float | None
    kl_topk_mean: float
    kl_topk_p99: float
    kl_full_mean: float
    abs_logprob_err_mean: float
    top1_agreement: float
    hidden_cosine: float | None
    hidden_cosine_no_massive: float | None
    encode_tokens_per_s: float
    decode_tokens_per_s: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return {**d, **self.extra}


def load_sample(dataset: Dataset, *, max_rows: int | None = None,
                hidden_layers: Sequence[int] | None = None) -> Sample:
    """The first documents of an exact dataset (up to ``max_rows`` teacher rows)."""
    m = dataset.manifest
    if not (dataset.codec.ids.capabilities.lossless and
            dataset.codec.values.capabilities.lossless):
        raise ConfigError(f"fidelity needs an exact dataset (lossless ids and values, e.g. int32 "
                          f"and float32); {dataset.uri} uses {m.codec.ids.kind}/"
                          f"{m.codec.values.kind}")
    layers = dataset.hidden_layers if hidden_layers is None else list(hidden_layers)
    head = layer = None
    if m.codec.dense:
        head, layer = load_head(dataset), dense_layer(m)
        layers = sorted(set(layers) | {layer})
    ids, lps, hidden, total = [], [], {layer: [] for layer in layers}, 0
    for doc in dataset.iter_documents(hidden_layers=layers):
        if doc.topk_ids.shape[0] == 0:
            continue
        ids.append(doc.topk_ids.numpy().astype(np.int64))
        lps.append(doc.topk_logprobs.numpy())
        for layer in layers:
            hidden[layer].append(doc.hidden[layer])
        total += ids[-1].shape[0]
        if max_rows is not None and total >= max_rows:
            break
    if not ids:
        raise ConfigError(f"{dataset.uri} has no teacher rows to evaluate")
    return Sample(ids, lps, hidden, m.teacher.vocab_size, m.teacher.hidden_size,
                  m.teacher.dtype, head, layer)


def resolve_lowrank(config: CodecConfig, calibration: dict[int, torch.Tensor]
                    ) -> tuple[CodecConfig, dict[str, bytes]]:
    """For a low-rank hidden codec without a projection: fit one per layer on the
    calibration hidden states [T, H]; returns the completed config and its artifacts."""
    if not needs_fitting(config):
        return config, {}
    if not calibration:
        raise ConfigError("a low-rank hidden codec needs captured hidden layers")
    artifact = fit_lowrank(calibration, config.hidden.params.get("rank"))
    params = {**config.hidden.params, "projection": LOWRANK_ARTIFACT,
              "projection_sha256": hashlib.sha256(artifact).hexdigest()}
    resolved = dataclasses.replace(config, hidden=ComponentSpec("lowrank", params))
    return resolved, {LOWRANK_ARTIFACT: artifact}


def split_calibration(sample: Sample, tokens: int) -> tuple[dict[int, torch.Tensor], int]:
    """Hidden states of the first documents (about ``tokens`` per layer) for fitting a
    projection, and how many documents that takes (they are left out of the cosine)."""
    lengths = [x.shape[0] for x in next(iter(sample.hidden.values()), [])]
    n_docs = min(int(np.searchsorted(np.cumsum(lengths), tokens)) + 1, max(len(lengths) - 1, 1))
    return {layer: torch.cat(docs[:n_docs]).float() for layer, docs in sample.hidden.items()}, \
        n_docs


def _aligned(ref_ids: np.ndarray, ids: np.ndarray, lps: np.ndarray) -> np.ndarray:
    """Decoded log-probs reordered to the reference's id order (same id set per row)."""
    ref_order, order = np.argsort(ref_ids, 1), np.argsort(ids, 1)
    if not np.array_equal(np.take_along_axis(ref_ids, ref_order, 1),
                          np.take_along_axis(ids, order, 1)):
        raise ConfigError("decoded ids differ from the exact top-k ids; fidelity compares "
                          "codecs that keep the id set")
    out = np.empty_like(lps)
    np.put_along_axis(out, ref_order, np.take_along_axis(lps, order, 1), 1)
    return out


def _kl_rows(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL between rows of log-probs, each renormalized to 1 (float64)."""
    p = p_log - np.logaddexp.reduce(p_log, axis=1, keepdims=True)
    q = q_log - np.logaddexp.reduce(q_log, axis=1, keepdims=True)
    return (np.exp(p) * (p - q)).sum(1)


def _kl_full(ref: np.ndarray, ref_tail: np.ndarray, k_ref: int, dec_full: np.ndarray,
             dec_in_topk: np.ndarray, dec_tail: np.ndarray, k_dec: int, vocab: int
             ) -> np.ndarray:
    """KL over the vocabulary, each side's missing mass spread evenly over its non-top-k.

    ``ref`` [N, K] exact log-probs; ``dec_full`` [N, K] the decoded log-probs of the same
    ids where the codec kept them (``dec_in_topk``), anything elsewhere.
    """
    p_tail = np.clip(ref_tail, 1e-30, 1.0)
    q_tail = np.clip(dec_tail, 1e-30, 1.0)
    q_top = np.where(dec_in_topk, np.exp(dec_full), 0.0)
    z = q_top.sum(1) + q_tail                       # decoded mass need not sum to 1
    q_other = q_tail / z / max(vocab - k_dec, 1)    # per token outside the decoded top-k
    q = np.where(dec_in_topk, q_top / z[:, None], q_other[:, None])
    p = np.exp(ref)
    kl = (p * (ref - np.log(q))).sum(1)
    return kl + p_tail * (np.log(p_tail / max(vocab - k_ref, 1)) - np.log(q_other))


def _cosines(ref: torch.Tensor, dec: torch.Tensor) -> tuple[float, float]:
    ref, dec = ref.double(), dec.double()
    n_massive = max(1, math.ceil(MASSIVE_FRACTION * ref.shape[1]))
    keep = torch.ones(ref.shape[1], dtype=torch.bool)
    keep[torch.topk(ref.abs().mean(0), n_massive).indices] = False
    cos = torch.nn.functional.cosine_similarity
    return (float(cos(ref, dec, dim=1).mean()),
            float(cos(ref[:, keep], dec[:, keep], dim=1).mean()))


def score_rows(sample: Sample, k: int, ids: torch.Tensor, lps: torch.Tensor,
               tail: torch.Tensor) -> dict[str, float]:
    """Divergences of decoded rank-ordered rows (top-k of every sample row, in sample
    order) and their missing mass from the sample's exact rows."""
    ids, lps, tail = ids.cpu().numpy(), lps.cpu().double().numpy(), tail.cpu().double().numpy()
    ref_ids = np.concatenate(sample.ids)
    ref = np.concatenate(sample.logprobs).astype(np.float64)
    dec = _aligned(ref_ids[:, :k], ids, lps)
    kl = _kl_rows(ref[:, :k], dec)
    ref_tail = np.clip(1.0 - np.exp(ref).sum(1), 0.0, 1.0)
    dec_full = np.concatenate([dec, np.zeros((dec.shape[0], sample.k - k))], axis=1)
    in_topk = np.broadcast_to(np.arange(sample.k) < k, ref.shape)
    kl_full = _kl_full(ref, ref_tail, sample.k, dec_full, in_topk, tail, k, sample.vocab_size)
    # top-1: the decoded most probable id (ties to the smallest id, as rank order breaks
    # them) is the exact one
    top = dec == dec.max(axis=1, keepdims=True)
    top1 = np.where(top, ref_ids[:, :k], np.iinfo(np.int64).max).min(axis=1) == ref_ids[:, 0]
    return {"kl_topk_mean": float(kl.mean()), "kl_topk_p99": float(np.percentile(kl, 99)),
            "kl_full_mean": float(kl_full.mean()),
            "abs_logprob_err_mean": float(np.abs(dec - ref[:, :k]).mean()),
            "top1_agreement": float(top1.mean())}


def document_batches(rows: Sequence[int], batch_tokens: int) -> list[slice]:
    """Consecutive documents grouped until each group holds at least ``batch_tokens`` rows
    (the last one may hold fewer)."""
    out, start, count = [], 0, 0
    for i, n in enumerate(rows):
        count += n
        if count >= batch_tokens:
            out.append(slice(start, i + 1))
            start, count = i + 1, 0
    if start < len(rows) or not out:   # no documents: one empty batch
        out.append(slice(start, len(rows)))
    return out


def evaluate(sample: Sample, config: CodecConfig, *, device: torch.device | str = "cpu",
             repeats: int = 1, calibration_tokens: int = 8192,
             batch_tokens: int = 8192) -> FidelityRow:
    """One codec against the sample; throughput is the best of ``repeats`` runs.

    A low-rank hidden codec without a projection gets one fitted on the first
    documents (``calibration_tokens``); its cosine is measured on the others.
    """
    if config.dense:
        return evaluate_dense(sample, config, device=device, repeats=repeats,
                              batch_tokens=batch_tokens)
    held_out = 0
    if config.hidden.kind == "lowrank" and "projection" not in config.hidden.params:
        calibration, held_out = split_calibration(sample, calibration_tokens)
        config, artifacts = resolve_lowrank(config, calibration)
    else:
        artifacts = {}
    codec = Codec(config, vocab_size=sample.vocab_size, top_k=sample.k,
                  hidden_size=sample.hidden_size, hidden_dtype=sample.hidden_dtype,
                  artifacts=artifacts.__getitem__)
    rows, k = sample.rows, codec.k
    enc_s = dec_s = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        blobs = [codec.encode_rows(i, v) for i, v in zip(sample.ids, sample.logprobs)]
        enc_s = min(enc_s, time.perf_counter() - t0)
        ids_b, vals_b = [b[0] for b in blobs], [b[1] for b in blobs]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = [codec.decode_rows_with_tail(ids_b[b], vals_b[b], rows[b], device)
               for b in document_batches(rows, batch_tokens)]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dec_s = min(dec_s, time.perf_counter() - t0)
    ids, lps, tail = (torch.cat(parts) for parts in zip(*out))
    n = sum(rows)
    scores = score_rows(sample, k, ids, lps, tail)
    extra = {}
    if sample.head is not None:   # a dense sample knows the true tail: score against it
        extra["kl_true_full_mean"] = true_full_kl(sample, ids, lps, tail)

    hidden_bytes = cos = cos_nm = None
    if sample.hidden:
        total_bytes, cosines = 0, []
        for layer, docs in sample.hidden.items():
            docs = docs[held_out:]
            hb = [codec.encode_hidden(x, layer) for x in docs]
            total_bytes += sum(map(len, hb))
            out = codec.decode_hidden(hb, [x.shape[0] for x in docs], device, layer).cpu()
            cosines.append(_cosines(torch.cat(docs), out))
        tokens = sum(x.shape[0] for x in next(iter(sample.hidden.values()))[held_out:])
        hidden_bytes = total_bytes / tokens / len(sample.hidden)
        cos = float(np.mean([c[0] for c in cosines]))
        cos_nm = float(np.mean([c[1] for c in cosines]))

    ids_bytes, vals_bytes = sum(map(len, ids_b)) / n, sum(map(len, vals_b)) / n
    return FidelityRow(
        codec=config.name, k=k, bytes_per_token=ids_bytes + vals_bytes,
        ids_bytes_per_token=ids_bytes, values_bytes_per_token=vals_bytes,
        hidden_bytes_per_token_layer=hidden_bytes,
        **scores, hidden_cosine=cos, hidden_cosine_no_massive=cos_nm,
        encode_tokens_per_s=n / enc_s, decode_tokens_per_s=n / dec_s, extra=extra)


def true_full_kl(sample: Sample, ids: torch.Tensor, lps: torch.Tensor, tail: torch.Tensor,
                 chunk: int = 512) -> float:
    """Mean KL(teacher || decoded) over the whole vocabulary, the teacher's true distribution
    rebuilt from a dense sample's exact last layer, the decoded side its top-k plus its
    missing mass spread evenly over the other ids (what ``missing: tail`` assumes)."""
    ref = torch.cat(sample.hidden[sample.dense_layer]).float()
    if ref.shape[0] != ids.shape[0]:
        raise ConfigError("the true full KL needs a teacher row at every position (a dataset "
                          "captured without a teacher mask)")
    vocab, k = sample.vocab_size, ids.shape[1]
    total = 0.0
    for lo in range(0, ref.shape[0], chunk):
        p = sample.head.log_probs(ref[lo:lo + chunk]).double()
        top, m = lps[lo:lo + chunk].double(), tail[lo:lo + chunk].double().clamp(min=1e-30)
        z = (top.exp().sum(1) + m).log()                   # decoded mass need not sum to 1
        q = ((m.log() - math.log(max(vocab - k, 1))) - z)[:, None].expand_as(p).clone()
        q.scatter_(1, ids[lo:lo + chunk].long(), top - z[:, None])
        total += float((p.exp() * (p - q)).sum())
    return total / ref.shape[0]


def _dense_scores(head: TeacherHead, ref: torch.Tensor, dec: torch.Tensor,
                  ref_ids: torch.Tensor, chunk: int = 512) -> dict[str, float]:
    """KL(exact || decoded) over the vocabulary per row, top-1 agreement and mean |delta
    log-prob| over the exact top-k ids, from last-layer states ``ref`` and ``dec`` [N, H]."""
    kls, top1, err = [], 0, 0.0
    for lo in range(0, ref.shape[0], chunk):
        p = head.log_probs(ref[lo:lo + chunk]).double()
        q = head.log_probs(dec[lo:lo + chunk]).double()
        kls.append((p.exp() * (p - q)).sum(1).clamp(min=0.0))
        top1 += int((p.argmax(1) == q.argmax(1)).sum())
        ids = ref_ids[lo:lo + chunk]
        err += float((p.gather(1, ids) - q.gather(1, ids)).abs().sum())
    kl = torch.cat(kls).numpy()
    return {"kl_topk_mean": float(kl.mean()), "kl_topk_p99": float(np.percentile(kl, 99)),
            "kl_full_mean": float(kl.mean()), "abs_logprob_err_mean": err / ref_ids.numel(),
            "top1_agreement": top1 / ref.shape[0]}


def evaluate_dense(sample: Sample, config: CodecConfig, *, device: torch.device | str = "cpu",
                   repeats: int = 1, batch_tokens: int = 8192) -> FidelityRow:
    """A dense codec against a dense exact sample (see the module's docstring)."""
    if sample.head is None:
        raise ConfigError(f"codec {config.name!r} is dense: its fidelity needs a dense exact "
                          f"dataset (captured with --codec dense-exact) as the reference")
    layer, head = sample.dense_layer, sample.head.to(device)
    codec = Codec(config, vocab_size=sample.vocab_size, top_k=sample.k,
                  hidden_size=sample.hidden_size, hidden_dtype=sample.hidden_dtype)
    states = sample.hidden[layer]
    lengths = [x.shape[0] for x in states]
    enc_s = dec_s = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        blobs = [codec.encode_hidden(x, layer) for x in states]
        enc_s = min(enc_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        decoded = []
        for b in document_batches(lengths, batch_tokens):
            h = codec.decode_hidden(blobs[b], lengths[b], device, layer)
            for lo in range(0, h.shape[0], 1024):   # the rebuild, as a reader would run it
                head.log_probs(h[lo:lo + 1024])
            decoded.append(h.cpu())
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dec_s = min(dec_s, time.perf_counter() - t0)
    ref, dec = torch.cat(states).float(), torch.cat(decoded)
    if ref.shape[0] != sum(sample.rows):
        raise ConfigError("fidelity of a dense codec needs a teacher row at every position "
                          "(a dataset captured without a teacher mask)")
    scores = _dense_scores(head, ref.to(device), dec.to(device),
                           torch.from_numpy(np.concatenate(sample.ids)).to(device))
    cos, cos_nm = _cosines(ref, dec)
    n = ref.shape[0]
    topk = [codec.encode_rows(i, v) for i, v in zip(sample.ids, sample.logprobs)]
    ids_bytes = sum(len(b[0]) for b in topk) / n
    vals_bytes = sum(len(b[1]) for b in topk) / n
    hidden_bytes = sum(map(len, blobs)) / n
    return FidelityRow(
        codec=config.name, k=sample.vocab_size,
        bytes_per_token=ids_bytes + vals_bytes + hidden_bytes,
        ids_bytes_per_token=ids_bytes, values_bytes_per_token=vals_bytes,
        hidden_bytes_per_token_layer=hidden_bytes, **scores, hidden_cosine=cos,
        hidden_cosine_no_massive=cos_nm, encode_tokens_per_s=n / enc_s,
        decode_tokens_per_s=n / dec_s,
        extra={"dense": True, "kl_true_full_mean": scores["kl_full_mean"]})


def evaluate_sampled(exact: Dataset, sampled: Dataset, *, max_rows: int | None = None,
                     device: torch.device | str = "cpu", batch_tokens: int = 8192
                     ) -> FidelityRow:
    """The row of a sampled capture (``sampled``) of the records of ``exact``: stored bytes,
    decode and re-encode speed, and the estimate's quality against the exact rows."""
    if sampling_of(sampled.manifest.codec) is None:
        raise ConfigError(f"{sampled.uri}: holds top-k rows, not the sampled signal")
    load_sample(exact, max_rows=1, hidden_layers=[])          # refuses a lossy reference
    doc_ids, ids_b, vals_b, rows = [], [], [], []
    for entry in sampled.shards:                              # the stored blobs
        pf = sampled.open_shard(entry)
        for rg in range(pf.num_row_groups):
            t = sampled.read_row_group(entry, pf, rg, ["doc_id", "num_tokens", "teacher_mask",
                                                       "topk_ids", "topk_values"])
            doc_ids += t.column("doc_id").to_pylist()
            ids_b += t.column("topk_ids").to_pylist()
            vals_b += t.column("topk_values").to_pylist()
            rows += [int(n) if m is None else int(sum(m)) for n, m in
                     zip(t.column("num_tokens").to_pylist(), t.column("teacher_mask").to_pylist())]
            if max_rows is not None and sum(rows) >= max_rows:
                break
        if max_rows is not None and sum(rows) >= max_rows:
            break
    codec, n = sampled.codec, sum(rows)
    if not n:
        raise ConfigError(f"{sampled.uri} has no teacher rows to evaluate")
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    decoded = [codec.decode_samples(ids_b[b], vals_b[b], rows[b], device)
               for b in document_batches(rows, batch_tokens)]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    dec_s = time.perf_counter() - t0
    ids = torch.cat([d[0] for d in decoded]).cpu().numpy()
    counts = torch.cat([d[1] for d in decoded]).cpu().numpy()
    bounds = np.cumsum([0] + rows)
    t0 = time.perf_counter()
    for a, b in zip(bounds[:-1], bounds[1:]):
        codec.encode_samples(ids[a:b], counts[a:b])
    enc_s = time.perf_counter() - t0
    scores = []
    for i, doc in zip(range(len(doc_ids)), exact.iter_documents(hidden_layers=[])):
        if doc.doc_id != doc_ids[i] or doc.num_teacher_rows != rows[i]:
            raise ConfigError(f"{sampled.uri} and {exact.uri} do not hold the same documents "
                              f"in the same order (document {i}: {doc_ids[i]} against "
                              f"{doc.doc_id}); capture the same records")
        a, b = bounds[i], bounds[i + 1]
        scores.append(_score_samples(doc.topk_ids.numpy(),
                                     doc.topk_logprobs.numpy().astype(np.float64),
                                     ids[a:b], counts[a:b], exact.manifest.teacher.vocab_size))
    if len(scores) != len(doc_ids):
        raise ConfigError(f"{exact.uri} holds fewer documents than {sampled.uri}")
    bias, tv, top1 = (np.concatenate(x) for x in zip(*scores))
    ids_bytes, vals_bytes = sum(map(len, ids_b)) / n, sum(map(len, vals_b)) / n
    nan = float("nan")
    return FidelityRow(
        codec=sampled.manifest.codec.name, k=codec.k, bytes_per_token=ids_bytes + vals_bytes,
        ids_bytes_per_token=ids_bytes, values_bytes_per_token=vals_bytes,
        hidden_bytes_per_token_layer=None, kl_topk_mean=nan, kl_topk_p99=nan, kl_full_mean=nan,
        abs_logprob_err_mean=nan, top1_agreement=float(top1.mean()), hidden_cosine=None,
        hidden_cosine_no_massive=None, encode_tokens_per_s=n / enc_s,
        decode_tokens_per_s=n / dec_s,
        extra={"draws": codec.k, "distinct_ids_per_row": float((counts > 0).sum() / n),
               "sample_ce_bias": float(bias.mean()),
               "sample_ce_bias_stderr": float(bias.std() / math.sqrt(len(bias))),
               "sample_tv_mean": float(tv.mean())})


def format_sampled(rows: Sequence[FidelityRow]) -> str:
    """The sampled rows' own figures, one line each (empty if there are none)."""
    return "\n".join(
        f"{r.codec}: {r.extra['draws']} draws, {r.extra['distinct_ids_per_row']:.1f} distinct "
        f"ids/row; sampled cross-entropy - exact entropy {r.extra['sample_ce_bias']:+.4f} "
        f"(+- {r.extra['sample_ce_bias_stderr']:.4f} standard error; 0 when unbiased); mean "
        f"total variation from the exact distribution {r.extra['sample_tv_mean']:.3f}"
        for r in rows if "sample_ce_bias" in r.extra)


def _score_samples(ref_ids: np.ndarray, ref: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                   vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: sampled cross-entropy error against the exact entropy, total variation
    between ``count / draws`` and the exact distribution, and top-1 agreement."""
    n, k_ref = ref.shape
    w = counts / counts.sum(1, keepdims=True)
    tail = np.clip(1.0 - np.exp(ref).sum(1), 0.0, 1.0)
    p_other = np.maximum(tail / max(vocab - k_ref, 1), 1e-300)       # each id outside top-K
    # the exact log-prob of every drawn id: its top-K entry, else the spread tail
    match = ids[:, :, None] == ref_ids[:, None, :]                       # [n, m, K]
    in_top = match.any(2)
    lp_top = np.where(match, ref[:, None, :], 0.0).sum(2)
    lp = np.where(in_top, lp_top, np.log(p_other)[:, None])
    live = counts > 0
    ce = -(np.where(live, w * lp, 0.0)).sum(1)
    p = np.exp(ref)
    entropy = -(p * ref).sum(1) - tail * np.log(p_other)
    # TV: |w - p| over the top-K ids, plus drawn ids outside it, plus the undrawn tail
    w_on_top = np.where(match & live[:, :, None], w[:, :, None], 0.0).sum(1)   # [n, K]
    w_outside = np.where(live & ~in_top, w, 0.0).sum(1)
    tv = 0.5 * (np.abs(w_on_top - p).sum(1) + np.abs(w_outside - tail))
    top1 = ids[:, 0] == ref_ids[:, 0]
    return ce - entropy, tv, top1


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A Markdown table of the rows."""
    head = ("| codec | k | B/token ids+values (dense: +last layer) | ids | values | "
            "hidden B/token/layer | "
            "KL top-k mean | KL top-k p99 | KL full mean | mean abs dlogp | top-1 | "
            "hidden cos | cos w/o massive | encode tok/s | decode tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def opt(x: float | None, fmt: str) -> str:
        return "-" if x is None or x != x else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r.codec} | {r.k} | {r.bytes_per_token:.1f} | {r.ids_bytes_per_token:.1f} | "
            f"{r.values_bytes_per_token:.1f} | {opt(r.hidden_bytes_per_token_layer, '.0f')} | "
            f"{opt(r.kl_topk_mean, '.2e')} | {opt(r.kl_topk_p99, '.2e')} | "
            f"{opt(r.kl_full_mean, '.2e')} | {opt(r.abs_logprob_err_mean, '.3g')} | "
            f"{r.top1_agreement:.4f} | "
            f"{opt(r.hidden_cosine, '.5f')} | {opt(r.hidden_cosine_no_massive, '.5f')} | "
            f"{r.encode_tokens_per_s:,.0f} | {r.decode_tokens_per_s:,.0f} |")
    return "\n".join(lines)


def plot(rows: Sequence[FidelityRow], path: str) -> None:
    """Bytes per token (ids + values) against mean top-k KL, one point per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.kl_topk_mean != r.kl_topk_mean:   # a sampled row has no top-k KL
            continue
        kl = max(r.kl_topk_mean, 1e-9)
        ax.scatter(r.bytes_per_token, kl)
        ax.annotate(r.codec, (r.bytes_per_token, kl), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per token (ids + values)")
    ax.set_ylabel("mean KL over the renormalized top-k")
    ax.set_title("codec size against fidelity (exact rows = KL 0, drawn at 1e-9)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
