"""The contract: manifest round trip, version refusal, path safety, codec identity."""

from __future__ import annotations

import json
import re

import pytest

from kdpipe.schemas import (CaptureSettings, CodecConfig, CodecMismatchError, ConfigError, DatasetError,
                            FormatVersionError, Manifest, PartState, ShardEntry, TeacherInfo)
from kdpipe.compress.manifests import merge_fragments
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
    with pytest.raises(ConfigError, match="unknown key 'extra'; valid keys: name, ids"):
        CodecConfig.from_dict({"ids": "int32", "values": "float32", "hidden": "native",
                               "extra": 1})


def test_manifest_unknown_key_and_wrong_type_name_the_path():
    d = json.loads(_manifest().to_json())
    d["capture"]["top_kk"] = 8
    with pytest.raises(DatasetError, match=r"^x/manifest.json: capture: unknown key 'top_kk'; "
                                           r"valid keys: backend, top_k"):
        Manifest.from_dict(d, "x/manifest.json")
    d = json.loads(_manifest().to_json())
    d["shards"][0]["tokens"] = "30"
    with pytest.raises(DatasetError, match=r"^x/manifest.json: shards\[0\].tokens: expected an "
                                           r"integer, got '30'$"):
        Manifest.from_dict(d, "x/manifest.json")
    d = json.loads(_manifest().to_json())
    d["codec"]["top_k"] = "all"
    with pytest.raises(DatasetError, match=r"codec.top_k: expected an integer, got 'all'$"):
        Manifest.from_dict(d, "x/manifest.json")


def test_manifest_of_other_minor_versions():
    """An older minor version lacks the fields added since (their defaults are taken); a newer
    one may carry fields this reader does not know (ignored: minor versions only add)."""
    d = json.loads(_manifest().to_json())
    for key in ("num_shards", "limit", "data_fingerprint"):
        del d["capture"][key]
    del d["records"], d["artifacts"], d["producer"]
    m = Manifest.from_dict(d)
    assert m.capture.data_fingerprint == "" and m.records.read == 0 and m.artifacts == {}
    d["format_version"] = "2.3"
    d["capture"]["new_setting"] = 1
    assert Manifest.from_dict(d).capture == m.capture


def test_codec_config_unknown_key_and_wrong_type_name_file_and_path(tmp_path):
    from kdpipe.compress import load_codec_config

    f = tmp_path / "c.yaml"
    f.write_text("ids: gaps\nvalues: {kind: grid, step: 0.002}\nhidden: fp8\ntopk: 4\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: unknown key 'topk'; valid "
                                          r"keys: name, ids, values, hidden, top_k, dense$"):
        load_codec_config(str(f))
    f.write_text("ids: gaps\nvalues: {kind: [grid]}\nhidden: fp8\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: values.kind: expected a "
                                          r"string, got \['grid'\]$"):
        load_codec_config(str(f))
    f.write_text("ids: gaps\nvalues: grid\nhidden: fp8\ntop_k: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: top_k: must be a positive integer, got 0$"):
        load_codec_config(str(f))
    f.write_text("ids: gaps\nvalues: {step: 0.002}\nhidden: fp8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: values: missing required key 'kind'$"):
        load_codec_config(str(f))
    assert load_codec_config("default").values.params == {"transform": "sqrt", "step": 0.0019}
