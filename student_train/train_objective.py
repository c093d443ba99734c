"""What training optimizes: the student, its hidden-state projections and the loss terms.

``DistillModule`` wraps the student so that everything touching parameters (the decoder,
the chunked LM head, the projections) runs inside one ``forward``, which is what DDP and
FSDP2 wrap. It returns per-term sums over the micro-batch; ``weighted_loss`` turns them
into the optimized scalar with normalizers counted over the whole global batch, so the
result does not depend on how the batch is split over ranks and micro-batches.

Dense terms (``dense_kl``...) compare the student with the teacher's full distribution,
rebuilt from the teacher's last-layer state (a hidden layer of the batch) through the teacher
head the module is given (``teacher_head``), on the same rows as the sparse losses.

Hidden-state targets follow what the dataset captured (``CaptureSettings.hidden_source``):
layer outputs (the student's ``hidden_states``) or attention-block outputs, which the student
matches with its token mixers' outputs (KDA or attention), read by forward hooks on the mapped
layers' ``self_attn``.

Masks: head losses use the loss rows (``loss_mask`` set, and a teacher row for the sparse
losses or a next token for CE); hidden-state losses use every position whose ``loss_mask``
is set, so assistant-only chat masks apply to all terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdpipe.compress.dense import TeacherHead
from kdpipe.schemas import ConfigError

from .dense_kl import DenseTerm, dense_losses
from .losses import hidden_loss
from .packing import PackedBatch
from .sparse_kl import HeadTerm, head_losses
from .train_config import DENSE_LOSSES, HIDDEN_LOSSES, TEACHER_LOSSES, LossConfig

DENSE_KINDS = DENSE_LOSSES + ("dense_top1",)


@dataclass(frozen=True)
class Term:
    name: str
    kind: str
    weight: float
    temperature: float = 1.0
    missing: str = "zero"

    @property
    def normalizer(self) -> str:
        """The count this term's sum is divided by (see ``PackedBatch.counts``)."""
        if self.kind in TEACHER_LOSSES or self.kind in DENSE_KINDS:
            return "kd_rows"
        return "ce_rows" if self.kind == "ce" else "hidden_tokens"


@dataclass(frozen=True)
class Objective:
    terms: tuple[Term, ...]
    layer_map: tuple[tuple[int, int], ...] = ()      # (student layer, teacher layer)
    chunk_size: int = 1024
    top1: bool = False
    dense_layer: int | None = None     # the teacher layer dense terms rebuild from

    @property
    def head_terms(self) -> list[HeadTerm]:
        return [HeadTerm(t.name, t.kind, t.temperature, t.missing) for t in self.terms
                if t.kind not in HIDDEN_LOSSES and t.kind not in DENSE_KINDS]

    @property
    def hidden_terms(self) -> list[Term]:
        return [t for t in self.terms if t.kind in HIDDEN_LOSSES] if self.layer_map else []

    @property
    def dense_terms(self) -> list[DenseTerm]:
        return [DenseTerm(t.name, t.kind, t.temperature) for t in self.terms
                if t.kind in DENSE_KINDS]

    @property
    def teacher_layers(self) -> list[int]:
        layers = {t for _, t in self.layer_map} if self.hidden_terms else set()
        if self.dense_terms and self.dense_layer is not None:
            layers.add(self.dense_layer)
        return sorted(layers)


def training_objective(loss: LossConfig, *, layer_map: list[tuple[int, int]],
                       dense_layer: int | None = None) -> Objective:
    names: dict[str, int] = {}
    terms = []
    for t in loss.terms:
        base = t.kind if t.temperature == 1.0 else f"{t.kind}_t{t.temperature:g}"
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}_{names[base]}"
        terms.append(Term(name, t.kind, t.weight, t.temperature, t.missing or loss.missing))
    uses_hidden = any(t.kind in HIDDEN_LOSSES for t in terms)
    return Objective(tuple(terms), tuple(layer_map) if uses_hidden else (), loss.chunk_size,
                     dense_layer=dense_layer)


def eval_objective(chunk_size: int = 1024, dense_layer: int | None = None) -> Objective:
    """Held-out metrics: KL(teacher || student) on the top-k plus the tail bucket at T=1,
    the same KL with the teacher renormalized on its top-k, next-token cross-entropy, and
    top-1 agreement; on a dense held-out set (``dense_layer`` given) also the exact
    full-vocabulary KL(teacher || student) and agreement with the teacher's full argmax."""
    dense = (Term("kl_full", "dense_kl", 0.0), Term("top1_full", "dense_top1", 0.0)) \
        if dense_layer is not None else ()
    return Objective((Term("kl", "kl", 1.0, 1.0, "tail"), Term("kl_topk", "kl", 0.0, 1.0, "zero"),
                      Term("ce", "ce", 1.0), *dense), (), chunk_size, top1=True,
                     dense_layer=dense_layer)


def weighted_loss(sums: dict[str, torch.Tensor], objective: Objective,
                  counts: dict[str, float]) -> torch.Tensor:
    """Sum of ``weight * sum / count`` over the terms (counts of the global batch)."""
    total = None
    for t in objective.terms:
        denom = counts[t.normalizer] * (len(objective.layer_map) if t.kind in HIDDEN_LOSSES else 1)
        part = sums[t.name] * (t.weight / max(denom, 1))
        total = part if total is None else total + part
    return total


class DistillModule(nn.Module):
    """The student plus what distillation adds: projections into the teacher's hidden size."""

    def __init__(self, student: nn.Module, *, objective: Objective, teacher_hidden_size: int,
                 projection: str = "auto", hidden_source: str = "residual",
                 teacher_head: TeacherHead | None = None) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.teacher_head = teacher_head     # frozen, outside the parameters and state dict
        self.hidden_source = hidden_source
        self._mixer_out: dict[int, torch.Tensor] = {}
        if hidden_source == "attention":
            layers = student.model.layers
            for s, _ in objective.layer_map:
                if not 1 <= s <= len(layers):
                    raise ConfigError(f"loss.layer_map: student layer {s} has no token mixer to "
                                      f"align with attention outputs (layers 1..{len(layers)})")
                layers[s - 1].self_attn.register_forward_hook(self._keeper(s))
        elif hidden_source != "residual":
            raise ConfigError(f"hidden states of kind {hidden_source!r}: this kdpipe knows "
                              f"residual and attention")
        width = student.config.hidden_size
        self.projections = nn.ModuleDict()
        if objective.hidden_terms and (projection == "always" or
                                       (projection == "auto" and width != teacher_hidden_size)):
            for s, _ in objective.layer_map:
                if str(s) in self.projections:
                    continue
                proj = nn.Linear(width, teacher_hidden_size, bias=False)
                if width == teacher_hidden_size:
                    with torch.no_grad():
                        proj.weight.copy_(torch.eye(width))
                self.projections[str(s)] = proj

    def _keeper(self, layer: int):
        def hook(_module, _inputs, output):
            if self._mixer_out is not None:
                self._mixer_out[layer] = output
        return hook

    def forward(self, batch: PackedBatch, objective: Objective | None = None,
                teacher_head: TeacherHead | None = None) -> dict[str, torch.Tensor]:
        """Per-term sums over the micro-batch's loss rows (hidden terms over positions);
        ``teacher_head``: the one dense terms use, if not the module's (a held-out set's)."""
        obj = objective or self.objective
        hidden_terms = obj.hidden_terms
        mixers = bool(hidden_terms) and self.hidden_source == "attention"
        self._mixer_out = {} if mixers else None
        out = self.student(batch.input_ids, cu_seqlens=batch.cu_seqlens,
                           cu_seqlens_cpu=torch.tensor(batch.bounds, dtype=torch.int32),
                           return_logits=False,
                           output_hidden_states=bool(hidden_terms) and not mixers,
                           use_cache=False)
        states = self._mixer_out if mixers else out.hidden_states
        self._mixer_out = None
        final = out.last_hidden_state[0]                                 # [N, H]
        sums = head_losses(final[batch.row_pos], self.student.get_output_embeddings().weight,
                           topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                           tail=batch.tail, has_teacher=batch.has_teacher, labels=batch.labels,
                           terms=obj.head_terms, chunk_size=obj.chunk_size, top1=obj.top1,
                           sample_ids=batch.sample_ids, sample_weights=batch.sample_weights) \
            if obj.head_terms or obj.top1 else {}
        if obj.dense_terms:
            head = teacher_head or self.teacher_head
            sums.update(dense_losses(
                final[batch.row_pos], self.student.get_output_embeddings().weight,
                teacher_hidden=batch.hidden[obj.dense_layer][batch.row_pos], head=head,
                has_teacher=batch.has_teacher, terms=obj.dense_terms,
                chunk_size=obj.chunk_size))
        if hidden_terms:
            pos = batch.hidden_pos      # an index, not a mask: selecting reads nothing back
            for t in hidden_terms:
                sums[t.name] = final.new_zeros((), dtype=torch.float32)
            for s, tl in obj.layer_map:
                h_s = states[s][0].index_select(0, pos)                  # [n, H_s]
                if str(s) in self.projections:
                    h_s = self.projections[str(s)](h_s)
                h_t = batch.hidden[tl].index_select(0, pos)              # [n, H_t]
                for t in hidden_terms:
                    sums[t.name] = sums[t.name] + hidden_loss(t.kind, h_s, h_t).sum()
        return sums
