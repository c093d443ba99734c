"""Teacher backends: run a model over token sequences, return top-k rows and hidden states.

``TeacherBackend`` is what the capture loop uses of a backend. ``HFBackend`` (transformers)
runs on CPU and GPU and is the reference the vLLM backend (``vllm_backend.VLLMBackend``) is
checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kdpipe.runtime import auto_dtype, to_device, torch_dtype
from kdpipe.schemas import ConfigError, TeacherInfo

from .sampling import document_generator, sample_rows
from .teacher import teacher_info
from .topk import topk_logprobs

CAPTURE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SequenceOutput:
    topk_ids: torch.Tensor          # [T, k] int64, backend's device ([T, 0] when sampling)
    topk_logprobs: torch.Tensor     # [T, k] float32, backend's device
    hidden: dict[int, torch.Tensor]  # layer -> [T, H] in the capture dtype, backend's device
    sample_ids: torch.Tensor | None = None      # [T, draws] int64, backend's device (sampling)
    sample_counts: torch.Tensor | None = None   # [T, draws] int32, backend's device


@dataclass(frozen=True)
class Sampling:
    """Draw ``draws`` ids per position at ``temperature`` instead of taking the top-k; each
    sequence's generator is seeded from ``seed`` and its document id."""

    draws: int
    temperature: float
    seed: int


class TeacherBackend(Protocol):
    """A teacher as the capture loop drives it; whoever loaded it closes it."""

    name: str
    tokenizer: Any            # the teacher's transformers tokenizer
    # True: give it a whole window per call, it forms the forward steps itself (vLLM's
    # scheduler); False: the loop batches sequences under its token budget
    schedules_batches: bool

    def forward_batch(self, seqs: list[np.ndarray]) -> list[SequenceOutput]:
        """Top-k rows and the requested hidden states of every sequence, in order."""
        ...

    def teacher_info(self, name_or_path: str, dtype: str) -> TeacherInfo:
        """The teacher's identity as the dataset records it."""
        ...

    def close(self) -> None:
        """Release the model (device memory, worker processes)."""
        ...


def resolve_dtype(dtype: str, device: str) -> str:
    """The capture dtype a ``--dtype`` names (``auto``: bfloat16 on a GPU, float32 elsewhere)."""
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in CAPTURE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use auto, {', '.join(CAPTURE_DTYPES)}")
    return dtype


HIDDEN_SOURCES = ("residual", "attention")


def parse_hidden_layers(spec: str, num_layers: int, *, source: str = "residual") -> list[int]:
    """``none``, ``all`` or a comma list; 0 = embeddings, i = output of decoder layer i
    (``source`` ``attention``: i = output of decoder layer i's attention block, i >= 1)."""
    if source not in HIDDEN_SOURCES:
        raise ConfigError(f"--hidden-source {source!r}: use {' or '.join(HIDDEN_SOURCES)}")
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(range(0 if source == "residual" else 1, num_layers + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as e:
        raise ConfigError(f"--hidden-layers {spec!r}: expected none, all or a list like 0,8,16")\
            from e
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad:
        raise ConfigError(f"--hidden-layers {bad}: the teacher has layers 0..{num_layers} "
                          f"(0 = embeddings, {num_layers} = last decoder layer)")
    if source == "attention" and 0 in layers:
        raise ConfigError("--hidden-layers 0 with --hidden-source attention: layer 0 is the "
                          "embeddings, which have no attention block (use 1..)")
    return layers


class HFBackend:
    """A causal LM from transformers, with hooks that collect the requested hidden states."""

    name = "hf"
    schedules_batches = False

    def __init__(self, model_path: str, *, device: str, dtype: str, top_k: int,
                 hidden_layers: list[int], trust_remote_code: bool = False,
                 hidden_source: str = "residual", sampling: Sampling | None = None) -> None:
        from transformers import AutoTokenizer

        self.device, self.dtype, self.top_k = device, dtype, top_k
        self.sampling = sampling
        self.tokenizer = AutoTokenizer.from_pretrained(model_path,
                                                       trust_remote_code=trust_remote_code)
        self.model = self._load_model(model_path, dtype, trust_remote_code)
        self.model.to(device).eval()
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        if top_k > self.vocab_size:
            raise ConfigError(f"--top-k {top_k} exceeds the vocabulary ({self.vocab_size})")
        self.hidden_layers = hidden_layers
        self.hidden_source = hidden_source
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)
        self._captured: dict[int, torch.Tensor] = {}
        self._install_hooks()

    def teacher_info(self, name_or_path: str, dtype: str) -> TeacherInfo:
        return teacher_info(name_or_path, self.model.config, self.tokenizer, dtype,
                            vocab_size=self.vocab_size, architecture=type(self.model).__name__)

    def head_artifact(self) -> bytes:
        """The teacher's final norm and LM head as a dense dataset ships them."""
        from .dense_head import extract_head
        return extract_head(self.model, logit_scale=self.logit_scale,
                            softcap=self.softcap).to_bytes()

    def _load_model(self, model_path: str, dtype: str, trust_remote_code: bool):
        """The model's weights from ``model_path`` (benchmarks override it with random ones)."""
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype),
                                                    trust_remote_code=trust_remote_code)

    def close(self) -> None:
        """Drop the model, so a process that goes on (a benchmark, a notebook) gets its
        device memory back."""
        self.model = self._base = None
        self._captured.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _decoder_layers(self):
        base = self.model.get_decoder()
        layers = getattr(base, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            raise ConfigError(f"{type(self.model).__name__}: cannot locate its decoder layers "
                              f"for hidden-state capture")
        return base, layers

    def _install_hooks(self) -> None:
        base, layers = self._decoder_layers()
        self._base = base

        def keep(layer: int):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                self._captured[layer] = out.detach()
            return hook

        for layer in self.hidden_layers:
            if layer == 0:
                module = base.get_input_embeddings()
            elif self.hidden_source == "attention":
                module = getattr(layers[layer - 1], "self_attn", None)
                if module is None:
                    raise ConfigError(f"{type(self.model).__name__}: its decoder layers have no "
                                      f"self_attn block to capture the output of")
            else:
                module = layers[layer - 1]
            module.register_forward_hook(keep(layer))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype (top-k reads them once, in float32 registers), or in
        float32 when the model rescales or soft-caps them."""
        logits = self.model.get_output_embeddings()(h)
        if self.logit_scale is None and self.softcap is None:
            return logits
        logits = logits.float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def forward_batch(self, seqs: list[np.ndarray], *, chunk_tokens: int = 2048,
                      doc_ids: list[str] | None = None) -> list[SequenceOutput]:
        """Run right-padded sequences in one forward; the LM head and top-k run in chunks so
        logits never exist for more than ``chunk_tokens`` positions at once. With
        ``sampling``, ``doc_ids`` (one per sequence) seed the sequences' draws.

        On a GPU the top-k rows stay there, like the hidden states, and nothing here reads the
        device back: the inputs go up from page-locked memory and the real positions are
        gathered by an index built on the host. The call returns with the window queued, and
        the host prepares the next one while the GPU runs this one; whoever copies the
        results out waits for them then."""
        lengths = [len(s) for s in seqs]
        B, L = len(seqs), max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
            mask[b, : len(s)] = 1
        real = torch.from_numpy(np.concatenate([b * L + np.arange(n)
                                                for b, n in enumerate(lengths)]))
        ids, mask, real = (to_device(t, self.device) for t in (ids, mask, real))
        self._captured.clear()
        # without padding, no mask: transformers would read an all-ones mask back to drop it
        out = self._base(input_ids=ids, attention_mask=mask if min(lengths) < L else None,
                         use_cache=False)
        h = out.last_hidden_state                                    # [B, L, H] after final norm
        flat = h.reshape(B * L, -1).index_select(0, real)           # real positions only
        hidden = {layer: t.reshape(B * L, -1).index_select(0, real)
                  for layer, t in self._captured.items()}
        if self.sampling is not None:
            return self._sampled(flat, lengths, hidden, doc_ids, chunk_tokens)
        top_ids, top_lps = [], []
        for start in range(0, flat.shape[0], chunk_tokens):
            i, lp = topk_logprobs(self._logits(flat[start:start + chunk_tokens]), self.top_k)
            top_ids.append(i)
            top_lps.append(lp)
        all_ids, all_lps = torch.cat(top_ids), torch.cat(top_lps)
        # hidden states stay on the device: the codec encodes them there (fewer bytes to copy)
        results, pos = [], 0
        for n in lengths:
            results.append(SequenceOutput(all_ids[pos:pos + n], all_lps[pos:pos + n],
                                          {k: v[pos:pos + n] for k, v in hidden.items()}))
            pos += n
        return results

    def _sampled(self, flat: torch.Tensor, lengths: list[int], hidden: dict[int, torch.Tensor],
                 doc_ids: list[str] | None, chunk_tokens: int) -> list[SequenceOutput]:
        """Each sequence's draws, from its own generator, in chunks of positions; like the
        top-k rows they stay on the device until the writer copies them."""
        s = self.sampling
        if doc_ids is None or len(doc_ids) != len(lengths):
            raise ValueError("sampling needs one document id per sequence")
        results, pos = [], 0
        for n, did in zip(lengths, doc_ids):
            gen = document_generator(s.seed, did, flat.device)
            ids, counts = [], []
            for start in range(pos, pos + n, chunk_tokens):
                i, c = sample_rows(self._logits(flat[start:min(start + chunk_tokens, pos + n)]),
                                   s.draws, temperature=s.temperature, generator=gen)
                ids.append(i)
                counts.append(c)
            empty = torch.zeros(n, 0, dtype=torch.long)
            results.append(SequenceOutput(empty, empty.float(),
                                          {k: v[pos:pos + n] for k, v in hidden.items()},
                                          torch.cat(ids), torch.cat(counts)))
            pos += n
        return results
