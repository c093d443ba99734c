"""Codec configuration: how teacher rows and hidden states are stored.

A codec has three independent parts, each a ``kind`` plus parameters:

* ``ids``    -- the top-k token ids of each position,
* ``values`` -- their log-probabilities (sorted descending by the reader),
* ``hidden`` -- the captured hidden states.

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

from .errors import CodecMismatchError, ConfigError


@dataclass(frozen=True)
class ComponentSpec:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_obj(cls, obj: Any, where: str) -> "ComponentSpec":
        if isinstance(obj, str):
            return cls(kind=obj)
        if not isinstance(obj, dict) or "kind" not in obj:
            raise ConfigError(f"{where}: expected a kind name or a mapping with 'kind', got {obj!r}")
        params = {k: v for k, v in obj.items() if k != "kind"}
        return cls(kind=str(obj["kind"]), params=params)

    def to_obj(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}


@dataclass(frozen=True)
class CodecConfig:
    """A complete codec description; ``name`` is informational (preset name or file stem)."""

    name: str
    ids: ComponentSpec
    values: ComponentSpec
    hidden: ComponentSpec
    top_k: int | None = None  # keep only the first top_k of the captured k (None: all)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "codec") -> "CodecConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
        known = {"name", "ids", "values", "hidden", "top_k"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
        for key in ("ids", "values", "hidden"):
            if key not in d:
                raise ConfigError(f"{where}: missing required key {key!r}")
        top_k = d.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f"{where}: top_k must be a positive integer, got {top_k!r}")
        return cls(name=str(d.get("name", "custom")),
                   ids=ComponentSpec.from_obj(d["ids"], f"{where}.ids"),
                   values=ComponentSpec.from_obj(d["values"], f"{where}.values"),
                   hidden=ComponentSpec.from_obj(d["hidden"], f"{where}.hidden"),
                   top_k=top_k)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ids": self.ids.to_obj(), "values": self.values.to_obj(),
                "hidden": self.hidden.to_obj(), "top_k": self.top_k}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "codec") -> "CodecConfig":
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: codec metadata is not valid JSON: {e}") from e

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


