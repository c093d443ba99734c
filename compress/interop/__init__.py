"""Reading and writing the formats of neighbouring tools (DistillKit, axolotl)."""

from __future__ import annotations

from kdpipe.schemas import CodecConfig, ConfigError

from ..codec import signal_of


def require_topk(config: CodecConfig, where: str, fmt: str) -> None:
    """Refuse the sampled teacher signal: these formats hold top-k log-probs only."""
    if signal_of(config) != "topk":
        raise ConfigError(f"{where}: holds the sampled teacher signal (ids drawn from the "
                          f"teacher with their counts), which the {fmt} format cannot "
                          f"represent: it stores top-k log-probs; export a top-k capture")
