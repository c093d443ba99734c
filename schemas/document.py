"""A document as the stages exchange it in memory, before encoding and after decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TeacherDocument:
    """One document with its teacher signal.

    ``topk_ids``/``topk_logprobs`` hold one row per position whose ``teacher_mask`` is
    true (all positions when the mask is None), sorted by descending log-prob with exact
    ties broken by ascending id. ``hidden`` maps a captured layer index to [T, H].

    ``tail_mass`` is each row's probability outside its top-k as the codec stored it (the
    ``grid`` values codec with ``tail_mass``, as in the ``default`` preset), which the
    quantized top-k alone cannot give back; None when the codec stores none, and then
    ``1 - sum(exp(topk_logprobs))`` is the best estimate (exact for lossless codecs).

    The sampled signal (codec ``ids: sampled``) holds no top-k: ``topk_ids`` and
    ``topk_logprobs`` are [N, 0], and ``sample_ids``/``sample_counts`` [N, draws] hold each
    row's distinct ids drawn from the teacher and how often each was drawn, count
    descending (ties by id), padded with id -1 and count 0. None for top-k signals.
    """

    doc_id: str
    input_ids: np.ndarray                      # [T] int32
    topk_ids: torch.Tensor                     # [N, k] int64
    topk_logprobs: torch.Tensor                # [N, k] float32
    tail_mass: torch.Tensor | None = None      # [N] float32 probability, or None
    loss_mask: np.ndarray | None = None        # [T] bool
    teacher_mask: np.ndarray | None = None     # [T] bool
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    record_index: int = -1                     # index of the input record it came from
    sample_ids: torch.Tensor | None = None     # [N, draws] int64, -1 padded
    sample_counts: torch.Tensor | None = None  # [N, draws] int32, 0 padded

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_teacher_rows(self) -> int:
        return self.num_tokens if self.teacher_mask is None else int(self.teacher_mask.sum())
