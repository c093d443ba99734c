"""The dense teacher signal: full-vocabulary log-probabilities rebuilt from a stored hidden state.

A teacher's distribution at a position is fixed by the output of its last decoder layer, its
final norm and its LM head. A dense dataset (codec ``dense: true``) stores that layer's output
like any captured hidden layer (layer ``num_hidden_layers``, so no extra bytes when it is
captured anyway) and ships the norm and the head once, as the artifact ``HEAD_ARTIFACT`` listed
with its sha256 in the manifest. ``TeacherHead`` rebuilds the logits exactly as the teacher
computes them (the norm in float32, cast to the teacher's dtype, the head in that dtype): from
a lossless hidden state the result is the teacher's own forward, and unlike stored top-k
log-probs it can be re-tempered exactly and has no missing tail.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from kdpipe.schemas import ConfigError, DatasetError, Manifest
from kdpipe.schemas.layout import MANIFEST

from .reader import ArtifactLoader, Dataset

HEAD_ARTIFACT = "artifacts/teacher_head.safetensors"
NORM_KINDS = ("rmsnorm", "layernorm")


def dense_layer(manifest: Manifest) -> int:
    """The captured layer a dense dataset's distributions are rebuilt from: the last one."""
    return manifest.teacher.num_hidden_layers


class TeacherHead:
    """The teacher's final norm and LM head, and the logits they give a last-layer output."""

    def __init__(self, *, norm: str, norm_weight: torch.Tensor, eps: float,
                 weight: torch.Tensor, norm_bias: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, logit_scale: float | None = None,
                 softcap: float | None = None) -> None:
        if norm not in NORM_KINDS:
            raise ConfigError(f"teacher head: unknown norm {norm!r}; known: {NORM_KINDS}")
        if weight.dim() != 2 or norm_weight.shape != (weight.shape[1],):
            raise ConfigError(f"teacher head: LM head {tuple(weight.shape)} and norm "
                              f"{tuple(norm_weight.shape)} do not fit together")
        self.norm, self.eps = norm, float(eps)
        self.norm_weight, self.norm_bias = norm_weight, norm_bias
        self.weight, self.bias = weight, bias
        self.logit_scale, self.softcap = logit_scale, softcap

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def to(self, device: torch.device | str) -> TeacherHead:
        def move(t):
            return None if t is None else t.to(device)
        return TeacherHead(norm=self.norm, norm_weight=move(self.norm_weight), eps=self.eps,
                           weight=move(self.weight), norm_bias=move(self.norm_bias),
                           bias=move(self.bias), logit_scale=self.logit_scale,
                           softcap=self.softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, H] last-layer outputs (any float dtype) -> [N, V] float32 logits."""
        x = h.to(self.dtype).float()
        if self.norm == "rmsnorm":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            x = self.norm_weight * x.to(self.dtype)
        else:
            x = F.layer_norm(x, (x.shape[-1],), self.norm_weight.float(),
                             None if self.norm_bias is None else self.norm_bias.float(),
                             self.eps).to(self.dtype)
        logits = F.linear(x, self.weight, self.bias).float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def log_probs(self, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """[N, H] -> [N, V] float32 log-probabilities at ``temperature``."""
        return torch.log_softmax(self.logits(h) / temperature, dim=-1)

    def to_bytes(self) -> bytes:
        """The artifact: a safetensors file with the tensors and the norm's settings."""
        from safetensors.torch import save
        tensors = {"norm.weight": self.norm_weight, "lm_head.weight": self.weight}
        if self.norm_bias is not None:
            tensors["norm.bias"] = self.norm_bias
        if self.bias is not None:
            tensors["lm_head.bias"] = self.bias
        settings = {"norm": self.norm, "eps": self.eps, "logit_scale": self.logit_scale,
                    "softcap": self.softcap}
        return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"kdpipe.teacher_head": json.dumps(settings, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> TeacherHead:
        from safetensors import SafetensorError
        from safetensors.torch import load
        try:
            tensors = load(data)
            # the settings are the header's metadata: 8 bytes of length, then JSON
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            settings = json.loads(header["__metadata__"]["kdpipe.teacher_head"])
            return cls(norm=settings["norm"], eps=settings["eps"],
                       norm_weight=tensors["norm.weight"], weight=tensors["lm_head.weight"],
                       norm_bias=tensors.get("norm.bias"), bias=tensors.get("lm_head.bias"),
                       logit_scale=settings.get("logit_scale"), softcap=settings.get("softcap"))
        except (SafetensorError, KeyError, ValueError, TypeError, ConfigError) as e:
            raise DatasetError(f"not a readable teacher head ({type(e).__name__}: {e})",
                               file=where) from e


def load_head(dataset: Dataset) -> TeacherHead:
    """The teacher head of a dense dataset, checked against the manifest's sha256 and the
    teacher's vocabulary and hidden size; a clear error for a dataset that has none."""
    m, storage = dataset.manifest, dataset.storage
    if not m.codec.dense:
        raise ConfigError(f"{dataset.uri}: not a dense dataset (codec {m.codec.name!r}); the "
                          f"full-vocabulary signal needs one captured with a dense codec "
                          f"(dense-bf16, dense-fp8, dense-exact)")
    if HEAD_ARTIFACT not in m.artifacts:
        raise DatasetError("dense dataset without its teacher head: the manifest does not "
                           "list it", file=storage.describe(HEAD_ARTIFACT))
    where = storage.describe(HEAD_ARTIFACT)
    head = TeacherHead.from_bytes(ArtifactLoader(storage, m.artifacts)(HEAD_ARTIFACT), where)
    t = m.teacher
    if (head.vocab_size, head.hidden_size) != (t.vocab_size, t.hidden_size):
        raise DatasetError(f"teacher head is {head.vocab_size} x {head.hidden_size}, the "
                           f"manifest's teacher has vocabulary {t.vocab_size} and hidden size "
                           f"{t.hidden_size}", file=where)
    if dense_layer(m) not in m.capture.hidden_layers:
        raise DatasetError(f"dense dataset without hidden layer {dense_layer(m)} (the last), "
                           f"which its distributions are rebuilt from",
                           file=storage.describe(MANIFEST))
    return head


@torch.no_grad()
def full_logprobs(head: TeacherHead, hidden: torch.Tensor, *, chunk: int = 1024
                  ) -> torch.Tensor:
    """[T, H] last-layer outputs -> [T, V] float32 log-probabilities, ``chunk`` rows at a time."""
    out = torch.empty(hidden.shape[0], head.vocab_size, dtype=torch.float32)
    for lo in range(0, hidden.shape[0], chunk):
        out[lo:lo + chunk] = head.log_probs(hidden[lo:lo + chunk]).cpu()
    return out

