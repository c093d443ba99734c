"""Codec components, registered by the kind names that codec configurations use.

ids:    int32 (lossless), packed (fixed-width bits, rank order), gaps (entropy-coded id set),
        sampled (distinct ids drawn from the teacher; with values counts)
values: float32 (lossless), grid (sqrt/log grid, entropy-coded), poly (head + normalized
        fit + residual bins), distillkit (DistillKit's layout and decoder)
hidden: native (lossless), bf16, fp8, int8, lowrank (projection stored in the dataset)
"""

from . import exact, grid, hidden, ids, poly, sampled  # noqa: F401  (register the kinds)
from .base import HIDDEN, IDS, VALUES, Capabilities, HiddenCodec, IdsCodec, ValuesCodec

__all__ = ["Capabilities", "HIDDEN", "IDS", "VALUES", "HiddenCodec", "IdsCodec", "ValuesCodec"]
