"""The dataset manifest: what a dataset holds and how to read it.

A dataset is a directory (or object-store prefix)::

    manifest.json                     # whole dataset, written once every part is complete
    parts/part-00000-of-00004.json    # one fragment per capture process, updated atomically
    shards/p00000-of-00004-000000.parquet
    artifacts/...                     # codec side data (e.g. hidden-state projections)

Each capture process (``--num-shards N --shard-index I``) owns one part and its
fragment. A fragment is a manifest with a single entry in ``parts``; the union of
fragments is the dataset, and ``manifest.json`` is that union written once every
part says ``complete``. Readers take ``manifest.json`` when present, else the union.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .codec_config import CodecConfig
from .convert import from_data
from .errors import ConfigError, DatasetError
from .version import (FORMAT_NAME, FORMAT_VERSION, check_format_version, is_newer_minor,
                      producer_version)


@dataclass
class TeacherInfo:
    """Identity of the model whose distributions the dataset holds."""

    name_or_path: str
    architecture: str
    config_sha256: str
    vocab_size: int            # width of the teacher's logits
    hidden_size: int
    num_hidden_layers: int
    tokenizer_sha256: str      # tokenizer_fingerprint of the teacher's tokenizer
    special_tokens: dict[str, int | None]
    dtype: str                 # dtype of the hidden states as captured


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over a tokenizer's vocabulary and special tokens: equal fingerprints tokenize
    alike. Capture records it; training compares its student's tokenizer against it."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"vocab": vocab, "special": tokenizer.all_special_tokens,
                          "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CaptureSettings:
    backend: str
    top_k: int
    max_seq_len: int
    dtype: str
    chat_template: bool
    hidden_layers: list[int]   # 0 = embedding output, i = output of decoder layer i
    text_field: str
    long_documents: str        # "truncate" or "split"
    data_source: str
    num_shards: int = 1
    limit: int | None = None
    data_fingerprint: str = ""  # content of a local input (capture.inputs.source_identity)
    # what the hidden columns hold: "residual" (layer outputs as above) or "attention" (the
    # output of decoder layer i's attention block, i >= 1, before it joins the residual)
    hidden_source: str = "residual"

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``hidden_source`` only where it is not the residual stream, so residual
        captures read as before and a reader that predates attention captures refuses one."""
        d = asdict(self)
        if d["hidden_source"] == "residual":
            del d["hidden_source"]
        return d

    def fingerprint(self) -> str:
        """What must not change between a killed run and its resumption."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class ShardEntry:
    file: str                  # relative to the dataset root
    part: int
    seq: int
    documents: int
    tokens: int
    teacher_rows: int
    bytes: int
    sha256: str
    first_record: int          # input record indices this shard covers (resume pointer)
    last_record: int


@dataclass
class RecordCounts:
    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    split: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, other: "RecordCounts") -> None:
        self.read += other.read
        self.written += other.written
        self.truncated += other.truncated
        self.split += other.split
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v


@dataclass
class PartState:
    index: int
    count: int
    complete: bool = False
    next_record: int = 0       # first input record index not yet committed by this part


@dataclass
class Manifest:
    teacher: TeacherInfo
    capture: CaptureSettings
    codec: CodecConfig
    shards: list[ShardEntry] = field(default_factory=list)
    records: RecordCounts = field(default_factory=RecordCounts)
    parts: list[PartState] = field(default_factory=list)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    producer: dict[str, str] = field(default_factory=lambda: {"name": "kdpipe",
                                                               "version": producer_version()})

    @property
    def complete(self) -> bool:
        return bool(self.parts) and all(p.complete for p in self.parts) and \
            len(self.parts) == self.parts[0].count

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["capture"] = self.capture.to_dict()
        d["codec"] = self.codec.to_dict()
        return d

    def to_json(self) -> str:
        """The on-disk form, with a checksum over everything else so that any damage is seen."""
        d = self.to_dict()
        d["checksum"] = _checksum(d)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Manifest":
        """A manifest of plain data. Keys an earlier version did not write take their defaults;
        an unknown key is damage, unless the manifest is of a newer minor version (which only
        adds optional fields)."""
        if not isinstance(d, dict):
            raise DatasetError("manifest is not a JSON object", file=where)
        if d.get("format") != FORMAT_NAME:
            raise DatasetError(f"not a kdpipe dataset manifest (format={d.get('format')!r})",
                               file=where)
        version = d.get("format_version", "?")
        check_format_version(version, where)
        unknown = "ignore" if is_newer_minor(version) else "error"
        body = {k: v for k, v in d.items() if k != "checksum"}   # from_json checks it
        try:
            return from_data(cls, body, unknown=unknown)
        except ConfigError as e:
            raise DatasetError(str(e), file=where) from e

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"not valid JSON ({e})", file=where) from e
        if not isinstance(d, dict) or "checksum" not in d:
            raise DatasetError("manifest has no checksum (damaged or not written by kdpipe)",
                               file=where)
        stored = d.pop("checksum")
        if stored != _checksum(d):
            raise DatasetError("manifest checksum mismatch: the file is damaged", file=where)
        return cls.from_dict(d, where)


def _checksum(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()
