"""Codec configuration: how teacher rows and hidden states are stored.

A codec has three independent parts, each a ``kind`` plus parameters:

* ``ids``    -- the top-k token ids of each position,
* ``values`` -- their log-probabilities (sorted descending by the reader),
* ``hidden`` -- the captured hidden states.

``dense: true`` adds the teacher's full distribution: capture keeps the last decoder layer's
output (encoded by the hidden codec like any captured layer) and ships the teacher's final
norm and LM head once as a dataset artifact, from which readers rebuild every row's
log-probabilities over the whole vocabulary (``compress.dense``).

The configuration travels with the data (manifest and every shard's Parquet
metadata); its fingerprint is what readers compare, so decoding data with a
configuration other than the one that encoded it is refused, never silently wrong.
Which kinds exist and what their parameters mean is the codec library's business
(``compress``); this module only fixes the shape and the identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .convert import from_data
from .errors import CodecMismatchError, ConfigError


@dataclass(frozen=True)
class ComponentSpec:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def canonical_data(cls, obj: Any) -> Any:
        """The plain form (a kind name alone, or a mapping of the kind beside its parameters)
        as the mapping of this dataclass's fields that ``from_data`` converts."""
        if isinstance(obj, str):
            return {"kind": obj}
        if not isinstance(obj, dict):
            return obj
        return {"params": {k: v for k, v in obj.items() if k != "kind"},
                **({"kind": obj["kind"]} if "kind" in obj else {})}

    def to_obj(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """A complete codec description; ``name`` is informational (preset name or file stem)."""

    name: str = "custom"
    ids: ComponentSpec
    values: ComponentSpec
    hidden: ComponentSpec
    top_k: int | None = None  # keep only the first top_k of the captured k (None: all)
    dense: bool = False       # also the full distribution: last layer + the teacher's head

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: must be a positive integer, got {self.top_k!r}")

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None) -> "CodecConfig":
        """The configuration of plain data; errors name ``where`` (a file) and the key path."""
        return from_data(cls, d, file=where)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "ids": self.ids.to_obj(), "values": self.values.to_obj(),
             "hidden": self.hidden.to_obj(), "top_k": self.top_k}
        if self.dense:   # only when set: the fingerprints of other codecs stay as they were
            d["dense"] = True
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "codec") -> "CodecConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: codec metadata is not valid JSON: {e}") from e
        return cls.from_dict(data, where)

    def fingerprint(self) -> str:
        """Identity of the encoding: everything but the informational name."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def require_same(self, other: "CodecConfig", where: str) -> None:
        if self.fingerprint() != other.fingerprint():
            raise CodecMismatchError(
                f"{where}: data was encoded with codec {other.name!r} ({other.to_json()}) "
                f"but is being read as {self.name!r} ({self.to_json()})")


