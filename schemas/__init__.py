"""The contract between kdpipe's stages: dataset layout, Arrow schema, manifest, codec config.

Capture writes what this package describes, training reads it; neither imports the other.
"""

from .arrow import hidden_column, shard_schema
from .codec_config import CodecConfig, ComponentSpec
from .document import TeacherDocument
from .errors import (CodecError, CodecMismatchError, ConfigError, DatasetError,
                     FormatVersionError, KdpipeError)
from .manifest import (CaptureSettings, Manifest, PartState, RecordCounts, ShardEntry,
                       TeacherInfo, tokenizer_fingerprint)
from .version import FORMAT_VERSION, producer_version

__all__ = [
    "CaptureSettings", "CodecConfig", "CodecError", "CodecMismatchError", "ComponentSpec",
    "ConfigError", "DatasetError", "FORMAT_VERSION", "FormatVersionError", "KdpipeError",
    "Manifest", "PartState", "RecordCounts", "ShardEntry", "TeacherDocument", "TeacherInfo",
    "hidden_column", "producer_version", "shard_schema",
    "tokenizer_fingerprint",
]
