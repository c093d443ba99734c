"""The Arrow schema of a shard, defined once.

One Parquet row per document. Teacher rows and hidden states are opaque byte
strings produced by the codec named in the shard's key-value metadata, so the
schema never changes when a codec does.

Row convention: row t of a document is the teacher's distribution over the token
that follows ``input_ids[t]``; a document of T tokens has T rows, the last one
predicting the token after the document. ``teacher_mask[t]`` says whether position
t has a teacher row (null column value: every position has one); the encoded
teacher blobs hold only the positions that have one, in order.
"""

from __future__ import annotations

import json

import pyarrow as pa

from .codec_config import CodecConfig
from .version import FORMAT_VERSION

DOC_ID = "doc_id"
INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
TEACHER_MASK = "teacher_mask"
NUM_TOKENS = "num_tokens"
TOPK_IDS = "topk_ids"
TOPK_VALUES = "topk_values"
HIDDEN_PREFIX = "hidden_"

META_FORMAT_VERSION = b"kdpipe.format_version"
META_CODEC = b"kdpipe.codec"
META_TEACHER = b"kdpipe.teacher"
META_CAPTURE = b"kdpipe.capture"


def hidden_column(layer: int) -> str:
    return f"{HIDDEN_PREFIX}{layer:03d}"


def shard_schema(hidden_layers: list[int], *, codec: CodecConfig | None = None,
                 teacher: dict | None = None, capture: dict | None = None) -> pa.Schema:
    """Schema of a shard holding the given hidden layers, with the self-describing metadata."""
    cols = [
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(NUM_TOKENS, pa.int32(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(LOSS_MASK, pa.list_(pa.bool_()), nullable=True),
        pa.field(TEACHER_MASK, pa.list_(pa.bool_()), nullable=True),
        pa.field(TOPK_IDS, pa.large_binary(), nullable=False),
        pa.field(TOPK_VALUES, pa.large_binary(), nullable=False),
    ]
    cols += [pa.field(hidden_column(layer), pa.large_binary(), nullable=False)
             for layer in hidden_layers]
    meta = {META_FORMAT_VERSION: FORMAT_VERSION.encode()}
    if codec is not None:
        meta[META_CODEC] = codec.to_json().encode()
    if teacher is not None:
        meta[META_TEACHER] = json.dumps(teacher, sort_keys=True).encode()
    if capture is not None:
        meta[META_CAPTURE] = json.dumps(capture, sort_keys=True).encode()
    return pa.schema(cols, metadata=meta)


def check_columns(schema: pa.Schema, hidden_layers: list[int]) -> list[str]:
    """Names of expected columns that are missing or of the wrong type (empty if all is well)."""
    expected = shard_schema(hidden_layers)
    problems = []
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            problems.append(f"missing column {f.name!r}")
        elif not schema.field(idx).type.equals(f.type):
            problems.append(f"column {f.name!r} has type {schema.field(idx).type}, expected {f.type}")
    return problems
