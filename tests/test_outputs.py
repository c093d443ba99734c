"""compress, import and export write nothing over what kdpipe did not write, and never
into or over the dataset they read."""

from __future__ import annotations

import dataclasses

import pytest

from kdpipe.compress import Dataset
from kdpipe.compress.codec import load_codec_config
from kdpipe.compress.interop import distillkit
from kdpipe.compress.verify import verify_dataset
from kdpipe.schemas import DatasetError
from tests.helpers import capture_small, run_main
from tests.test_codec_facade import make_documents, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir):
    return capture_small(tmp_path_factory.mktemp("outputs") / "ds", teacher_dir, n_docs=3,
                         top_k=128)


def kdpipe(args, capsys, monkeypatch) -> tuple[int, str]:
    code, _, err = run_main(args, capsys, monkeypatch)
    assert "Traceback" not in err
    return code, err


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_outputs_overlapping_the_source_are_refused(dataset, capsys, monkeypatch):
    before = snapshot(dataset)
    for args in (["compress", dataset, dataset, "--codec", "exact"],
                 ["compress", dataset, dataset / "small", "--codec", "small"],
                 ["compress", dataset, dataset.parent, "--codec", "small", "--overwrite"],
                 ["export", "--format", "axolotl", dataset, dataset, "--overwrite"],
                 ["export", "--format", "axolotl", dataset, dataset / "shards"]):
        code, err = kdpipe(args, capsys, monkeypatch)
        assert code == 2 and "overlaps" in err, (args, err)
    assert snapshot(dataset) == before


def test_foreign_directories_are_refused_even_with_overwrite(dataset, tmp_path, capsys,
                                                             monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "data_0.parquet").write_text("not an export either")
    for args in (["compress", dataset, foreign, "--codec", "small"],
                 ["compress", dataset, foreign, "--codec", "small", "--overwrite"],
                 ["export", "--format", "axolotl", dataset, foreign],
                 ["export", "--format", "distillkit", dataset, foreign, "--overwrite"]):
        code, err = kdpipe(args, capsys, monkeypatch)
        assert code == 2 and "notes.txt" in err and str(foreign) in err, (args, err)
    assert snapshot(foreign) == {"notes.txt": b"keep me",
                                 "data_0.parquet": b"not an export either"}


def test_export_replaces_an_earlier_export_only_when_asked(dataset, tmp_path, capsys,
                                                           monkeypatch):
    out = tmp_path / "ax"
    assert kdpipe(["export", "--format", "axolotl", dataset, out], capsys, monkeypatch)[0] == 0
    first = snapshot(out)
    assert list(first) == ["data_0.parquet"]
    code, err = kdpipe(["export", "--format", "axolotl", dataset, out], capsys, monkeypatch)
    assert code == 2 and "--overwrite" in err and snapshot(out) == first
    (out / "data_7.parquet").write_bytes(b"left over from a larger export")
    code, _ = kdpipe(["export", "--format", "axolotl", dataset, out, "--overwrite"], capsys,
                     monkeypatch)
    assert code == 0 and snapshot(out) == first   # the stale file is gone, the rest rewritten


def test_failed_export_removes_only_its_own_files(tmp_path):
    """DistillKit cannot hold positions without a teacher row: the export stops at the
    document that has some, and the files it wrote before it are removed again."""
    docs = make_documents(4, seed=8)   # documents 0 and 3 have holes in their teacher mask
    ordered = [dataclasses.replace(d, record_index=i)
               for i, d in enumerate([docs[1], docs[2], docs[0]])]
    src = Dataset(write_dataset(tmp_path / "kd", ordered))
    out = tmp_path / "dk"
    out.mkdir()
    with pytest.raises(DatasetError, match="teacher row"):
        distillkit.export_dataset(src, out, codec=load_codec_config("distillkit-recommended"),
                                  docs_per_file=1)
    assert list(out.iterdir()) == []
    # what the failed run had written before the third document: the same as this
    n = distillkit.export_dataset(Dataset(write_dataset(tmp_path / "ok", ordered[:2])), out,
                                  codec=load_codec_config("distillkit-recommended"),
                                  docs_per_file=1)
    assert n >= 1 and sorted(p.name for p in out.iterdir()) == \
        ["compression_config.yaml"] + [f"data_{i}.parquet" for i in range(n)]


def test_compress_overwrite_replaces_only_a_kdpipe_dataset(dataset, tmp_path, capsys,
                                                           monkeypatch):
    dst = tmp_path / "small"
    assert kdpipe(["compress", dataset, dst, "--codec", "small"], capsys, monkeypatch)[0] == 0
    # another codec into the same DST: refused without --overwrite, the dataset kept
    code, err = kdpipe(["compress", dataset, dst, "--codec", "default"], capsys, monkeypatch)
    assert code == 2 and "different configuration" in err
    assert Dataset(str(dst)).manifest.codec.name == "small"
    code, _ = kdpipe(["compress", dataset, dst, "--codec", "default", "--overwrite"], capsys,
                     monkeypatch)
    assert code == 0 and Dataset(str(dst)).manifest.codec.name == "default"
    assert verify_dataset(str(dst), deep=True).ok
    assert verify_dataset(str(dataset), deep=True).ok
