"""Codec components, registered by the kind names that codec configurations use."""

from . import exact  # noqa: F401  (registers the lossless kinds)
from .base import HIDDEN, IDS, VALUES, HiddenCodec, IdsCodec, ValuesCodec

__all__ = ["HIDDEN", "IDS", "VALUES", "HiddenCodec", "IdsCodec", "ValuesCodec"]
