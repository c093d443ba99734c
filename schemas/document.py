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
    """

    doc_id: str
    input_ids: np.ndarray                      # [T] int32
    topk_ids: torch.Tensor                     # [N, k] int64
    topk_logprobs: torch.Tensor                # [N, k] float32
    loss_mask: np.ndarray | None = None        # [T] bool
    teacher_mask: np.ndarray | None = None     # [T] bool
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    record_index: int = -1                     # index of the input record it came from

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_teacher_rows(self) -> int:
        return self.num_tokens if self.teacher_mask is None else int(self.teacher_mask.sum())
