"""The contract: manifest round trip, version refusal, path safety, codec identity."""

from __future__ import annotations

import json

import pytest

from kdpipe.schemas import (CaptureSettings, CodecConfig, CodecMismatchError, ConfigError, DatasetError,
                            FormatVersionError, Manifest, PartState, ShardEntry, TeacherInfo,
                            merge_fragments)
from kdpipe.schemas.layout import safe_relpath


def _manifest(part: int = 0, count: int = 1, complete: bool = True) -> Manifest:
    return Manifest(
        teacher=TeacherInfo("t", "LlamaForCausalLM", "c" * 64, 100, 8, 2, "f" * 64,
                            {"bos": 1, "eos": 2, "pad": None, "unk": 0}, "float32"),
        capture=CaptureSettings("hf", 8, 64, "float32", True, [0, 2], "text", "truncate", "d",
                                count),
        codec=CodecConfig.from_dict({"name": "exact", "ids": "int32", "values": "float32",
                                     "hidden": "native"}),
        shards=[ShardEntry(f"shards/p{part}", part, 0, 3, 30, 30, 100, "a" * 64, part, part)],
        parts=[PartState(part, count, complete, part + 1)])


def test_manifest_round_trip():
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m


def test_newer_major_version_refused():
    d = json.loads(_manifest().to_json())
    d["format_version"] = "3.0"
    with pytest.raises(FormatVersionError, match="upgrade kdpipe"):
        Manifest.from_dict(d, "x/manifest.json")
    d["format_version"] = "2.7"  # newer minor: readable
    Manifest.from_dict(d)
    d["format_version"] = "1.0"  # older major: its codec payloads are not read here
    with pytest.raises(FormatVersionError, match="older"):
        Manifest.from_dict(d, "x/manifest.json")


def test_missing_key_names_it():
    d = json.loads(_manifest().to_json())
    del d["teacher"]["vocab_size"]
    with pytest.raises(DatasetError, match="vocab_size"):
        Manifest.from_dict(d, "m.json")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "", "s3:x", "a\\b"])
def test_paths_cannot_escape_root(bad):
    with pytest.raises(DatasetError):
        safe_relpath(bad)


def test_fragments_merge_and_conflict():
    merged = merge_fragments([("b", _manifest(1, 2)), ("a", _manifest(0, 2))])
    assert merged.complete and [s.part for s in merged.shards] == [0, 1]
    other = _manifest(1, 2)
    other.capture.top_k = 16
    with pytest.raises(DatasetError, match="top_k"):
        merge_fragments([("a", _manifest(0, 2)), ("b", other)])
    assert not merge_fragments([("a", _manifest(0, 2))]).complete


def test_codec_identity_and_unknown_keys():
    a = CodecConfig.from_dict({"name": "x", "ids": "int32", "values": "float32",
                               "hidden": "native"})
    b = CodecConfig.from_dict({"name": "y", "ids": "int32", "values": "float32",
                               "hidden": "native"})
    a.require_same(b, "here")  # the name is informational
    c = CodecConfig.from_dict({"ids": "int32", "values": "float32", "hidden": "native",
                               "top_k": 4})
    with pytest.raises(CodecMismatchError, match="here"):
        a.require_same(c, "here")
    with pytest.raises(ConfigError, match="unknown keys"):
        CodecConfig.from_dict({"ids": "int32", "values": "float32", "hidden": "native",
                               "extra": 1})
